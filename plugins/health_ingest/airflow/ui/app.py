"""The Ingestion view's FastAPI app, mounted by the Airflow API server: pages and JSON read from the warehouse as
`health_ingest_reader`, every route behind Airflow's own authentication and authorisation.

Imported only when the app is built (`mount.LazyApp`), in the API server, where Airflow's API modules are loaded."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Annotated, Any, get_type_hints

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, create_model

from health_ingest import config
from health_ingest.airflow.ui import URL_PREFIX, pages
from health_ingest.warehouse import monitoring

CHART_DAYS = 30
STATIC_FILES = {
    "ingestion.css": "text/css; charset=utf-8",
    "theme.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
    "icon-dark.svg": "image/svg+xml",
}


class SourceOut(BaseModel):
    name: str
    dag_id: str
    kind: str
    format: str
    owner: str
    expect_every_seconds: float | None
    freshness: str  # fresh | late | quiet | no cadence
    last_batch: dict[str, Any] | None
    last_committed_batch: dict[str, Any] | None


# the batch fields of the JSON API are the query's own, so the two cannot drift apart
BatchOut = create_model(
    "BatchOut",
    **{name: (kind, ...) for name, kind in get_type_hints(monitoring.BatchSummary).items()},
    seconds=(float | None, ...),
)


class BatchDetailOut(BatchOut):
    key_id: str
    hosting: str | None
    error: str | None
    step_seconds: dict[str, float]
    airflow: dict[str, Any] | None
    files: list[dict[str, Any]]
    deleted_by_type: dict[str, int]
    quarantine_by_reason: dict[str, int]
    quality: list[dict[str, Any]]
    privacy_checks: list[dict[str, Any]]


class FeedOut(BaseModel):
    commit_seq: int
    batch_id: str
    source: str
    committed_at: datetime | None
    rows_by_type: dict[str, int]
    rows_deleted: int


def create_app() -> FastAPI:
    # viewer level: reading DAG runs; an anonymous request gets 401, a user without the right 403
    app = FastAPI(
        title="health-ingest: Ingestion",
        version=_version(),
        description="Sources, batches, quarantine and data quality of health-ingest, read from the warehouse.",
        dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))],
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request, user: GetUserDep) -> str:
        now = datetime.now(UTC)
        sources = _visible_sources(user)
        days = [(now - timedelta(days=n)).date() for n in range(CHART_DAYS - 1, -1, -1)]
        since = datetime.combine(days[0], datetime.min.time(), tzinfo=UTC)
        with _reader() as conn:
            activity = monitoring.sources_activity(conn, [s.name for s in sources])
            daily = [d for d in monitoring.daily_activity(conn, since) if d.source in {s.name for s in sources}]
        rows = []
        for source, act in zip(sources, activity, strict=True):
            per_day = {d.day.date(): d.rows_loaded for d in daily if d.source == source.name}
            rows.append(
                pages.SourceRow(
                    name=source.name,
                    kind=source.kind,
                    format=source.format,
                    owner=source.owner,
                    dag_id=source.dag_id,
                    expect_every=source.expect_every,
                    activity=act,
                    freshness=monitoring.freshness(act, source.expect_every, now),
                    loaded_per_day=[float(per_day.get(day, 0)) for day in days],
                )
            )
        return pages.overview_page(_links(request), rows, days, daily, now)

    @app.get("/batches", response_class=HTMLResponse, include_in_schema=False)
    def batches(
        request: Request,
        user: GetUserDep,
        source: str | None = None,
        status: str | None = None,
        before: datetime | None = None,
    ) -> str:
        if source:
            _authorize_source(user, source)
        with _reader() as conn:
            found = monitoring.list_batches(conn, source=source, status=status, before=before, limit=50)
        found = [b for b in found if source or _may_read_batch(user, b)]
        next_before = found[-1].started_at.isoformat() if len(found) == 50 else None
        return pages.batches_page(_links(request), found, next_before=next_before, source=source)

    @app.get("/batches/{batch_id}", response_class=HTMLResponse, include_in_schema=False)
    def batch(request: Request, batch_id: str, user: GetUserDep) -> str:
        record = _batch_record(batch_id, user)
        return pages.batch_page(_links(request), record, _dag_id(record.summary.source, record.summary.kind))

    @app.get("/batches/{batch_id}/docs", response_class=HTMLResponse, include_in_schema=False)
    def data_docs(request: Request, batch_id: str, user: GetUserDep) -> str:
        record = _batch_record(batch_id, user)
        return pages.data_docs_page(_links(request), record.summary, record.quality, version=_version())

    @app.get("/consumers", response_class=HTMLResponse, include_in_schema=False)
    def consumers(request: Request, user: GetUserDep) -> str:
        with _reader() as conn:
            entries = monitoring.committed_feed(conn, limit=100)
        entries = [e for e in entries if _may_read_batch(user, e.summary)]
        return pages.feed_page(_links(request), entries, _table_name)

    @app.get("/api/sources", response_model=list[SourceOut], summary="Declared sources and their freshness")
    def api_sources(user: GetUserDep) -> list[SourceOut]:
        now = datetime.now(UTC)
        sources = _visible_sources(user)
        with _reader() as conn:
            activity = monitoring.sources_activity(conn, [s.name for s in sources])
        return [
            SourceOut(
                name=s.name,
                dag_id=s.dag_id,
                kind=s.kind,
                format=s.format,
                owner=s.owner,
                expect_every_seconds=s.expect_every.total_seconds() if s.expect_every else None,
                freshness=monitoring.freshness(a, s.expect_every, now),
                last_batch=_batch_out(a.last).model_dump(mode="json") if a.last else None,
                last_committed_batch=_batch_out(a.last_committed).model_dump(mode="json") if a.last_committed else None,
            )
            for s, a in zip(sources, activity, strict=True)
        ]

    @app.get("/api/batches", response_model=list[BatchOut], summary="Batches, newest first")
    def api_batches(
        user: GetUserDep,
        source: str | None = None,
        status: Annotated[str | None, Query(pattern="^(loading|committed|rejected|failed)$")] = None,
        before: Annotated[datetime | None, Query(description="page back: the last started_at seen")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[BatchOut]:
        if source:
            _authorize_source(user, source)
        with _reader() as conn:
            found = monitoring.list_batches(conn, source=source, status=status, before=before, limit=limit)
        return [_batch_out(b) for b in found if source or _may_read_batch(user, b)]

    @app.get("/api/batches/{batch_id}", response_model=BatchDetailOut, summary="One batch with its record")
    def api_batch(batch_id: str, user: GetUserDep) -> BatchDetailOut:
        record = _batch_record(batch_id, user)
        reasons: dict[str, int] = {}
        for item in record.quarantine:
            reasons[item.reason] = reasons.get(item.reason, 0) + item.records
        return BatchDetailOut(
            **_batch_out(record.summary).model_dump(),
            key_id=record.key_id,
            hosting=record.hosting,
            error=record.error,
            step_seconds=record.step_seconds,
            airflow=(
                {
                    "dag_id": record.airflow_dag_id,
                    "run_id": record.airflow_run_id,
                    "task_id": record.airflow_task_id,
                    "try_number": record.airflow_try_number,
                    "map_index": record.airflow_map_index,
                }
                if record.airflow_dag_id
                else None
            ),
            files=[vars(f) for f in record.files],
            deleted_by_type=record.deleted_by_type,
            quarantine_by_reason=reasons,
            quality=[{**vars(q), "checked_at": q.checked_at.isoformat()} for q in record.quality],
            privacy_checks=[vars(p) for p in record.privacy],
        )

    @app.get("/api/feed", response_model=list[FeedOut], summary="Committed batches as consumers read them")
    def api_feed(
        user: GetUserDep,
        after: Annotated[int | None, Query(description="a watermark: commits after it")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[FeedOut]:
        with _reader() as conn:
            entries = monitoring.committed_feed(conn, after=after, limit=limit)
        return [
            FeedOut(
                commit_seq=e.summary.commit_seq,
                batch_id=e.summary.batch_id,
                source=e.summary.source,
                committed_at=e.summary.committed_at,
                rows_by_type={_table_name(e.summary, name): rows for name, rows in e.rows_by_type.items()},
                rows_deleted=e.summary.rows_deleted,
            )
            for e in entries
            if _may_read_batch(user, e.summary)
        ]

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> JSONResponse:
        schema = dict(app.openapi())
        schema["servers"] = [{"url": request.scope.get("root_path", URL_PREFIX)}]
        return JSONResponse(schema)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "no such file")
        body = (resources.files("health_ingest.airflow.ui") / "static" / name).read_bytes()
        return Response(body, media_type=STATIC_FILES[name], headers={"Cache-Control": "private, max-age=300"})

    return app


# --- implementation details -------------------------------------------------------------------

_POOL: list = []
_POOL_LOCK = threading.Lock()
_POOL_SIZE = 4


class _reader:
    """A pooled read-only connection as `health_ingest_reader`; a broken one is dropped, not returned."""

    def __enter__(self):
        with _POOL_LOCK:
            self.conn = _POOL.pop() if _POOL else None
        if self.conn is None or self.conn.closed:
            self.conn = monitoring.connect_as_reader(_warehouse_url())
        return self.conn

    def __exit__(self, kind, error, trace) -> None:
        broken = self.conn.closed or (error is not None and _is_connection_error(error))
        with _POOL_LOCK:
            if not broken and len(_POOL) < _POOL_SIZE:
                _POOL.append(self.conn)
                return
        self.conn.close()


def _is_connection_error(error: BaseException) -> bool:
    import psycopg2

    return isinstance(error, psycopg2.OperationalError | psycopg2.InterfaceError)


_URL: list[str] = []


def _warehouse_url() -> str:
    """`HEALTH_INGEST_WAREHOUSE_URL`, else the Airflow connection `health_ingest_warehouse`, else the embedded
    warehouse: the same lookup as the batch path's."""
    if not _URL:
        from health_ingest.warehouse.connection import warehouse_url

        _URL.append(warehouse_url())
    return _URL[0]


_SOURCES_CACHE: dict[tuple[str, float], list] = {}


def _declared_sources() -> list:
    from health_ingest.sources.registry import load_sources

    path = config.sources_file()
    key = (str(path), path.stat().st_mtime)
    if key not in _SOURCES_CACHE:
        _SOURCES_CACHE.clear()
        _SOURCES_CACHE[key] = list(load_sources(path).values())
    return _SOURCES_CACHE[key]


def _visible_sources(user) -> list:
    return [s for s in _declared_sources() if _may_read_dag(user, s.dag_id)]


def _dag_id(source: str, kind: str) -> str:
    return f"{kind}_{source}"


def _may_read(user, source: str) -> bool:
    """A source's batches are the runs of its DAG; a source no longer declared is read as either kind's."""
    declared = {s.name: s.dag_id for s in _declared_sources()}
    if source in declared:
        return _may_read_dag(user, declared[source])
    return any(_may_read_dag(user, _dag_id(source, kind)) for kind in ("fhir", "claims"))


def _may_read_batch(user, summary: monitoring.BatchSummary) -> bool:
    return _may_read_dag(user, _dag_id(summary.source, summary.kind))


def _may_read_dag(user, dag_id: str) -> bool:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user
    )


def _authorize_source(user, source: str) -> None:
    if not _may_read(user, source):
        raise HTTPException(403, "Forbidden")


def _batch_record(batch_id: str, user) -> monitoring.BatchRecord:
    import uuid

    try:
        uuid.UUID(batch_id)
    except ValueError:
        raise HTTPException(404, "no such batch") from None
    with _reader() as conn:
        record = monitoring.batch_record(conn, batch_id)
    if record is None:
        raise HTTPException(404, "no such batch")
    if not _may_read_dag(user, _dag_id(record.summary.source, record.summary.kind)):
        raise HTTPException(403, "Forbidden")
    return record


def _batch_out(summary: monitoring.BatchSummary) -> BatchOut:
    return BatchOut.model_validate(summary, from_attributes=True)


def _table_name(summary: monitoring.BatchSummary, name: str) -> str:
    """The warehouse table a type or claims table of a batch was written to, as the Asset events name it."""
    if summary.kind != "claims":
        return f"fhir.{name.lower()}"
    formats = {s.name: s.format for s in _declared_sources()}
    if summary.source not in formats:  # a source no longer declared: its own name is the best there is
        return name
    from health_ingest.formats.claims import load_profile

    try:
        return "claims." + load_profile(formats[summary.source]).warehouse_table(name)
    except Exception:  # a table the profile does not know (any more)
        return name


def _links(request: Request) -> pages.Links:
    plugin = request.scope.get("root_path", URL_PREFIX).rstrip("/") or URL_PREFIX
    return pages.Links(plugin=plugin, airflow=plugin.removesuffix(URL_PREFIX))


def _version() -> str:
    from health_ingest import __version__

    return __version__
