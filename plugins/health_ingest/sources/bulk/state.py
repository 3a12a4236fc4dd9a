"""Where each pulled source stands, in `ingest.source_state`: its next `_since` and the export in flight."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class SourceState:
    source: str
    since: datetime | None = None
    status_url: str | None = None
    request: str | None = None
    kicked_off_at: datetime | None = None
    full_refresh: bool = False
    progress: str | None = None
    transaction_time: datetime | None = None
    expires_at: datetime | None = None
    delivery: str | None = None  # the landing folder, once every file is downloaded


COLUMNS = (
    "since, export_status_url, export_request, export_kicked_off_at, coalesce(export_full_refresh, false), "
    "export_progress, export_transaction_time, export_expires_at, export_delivery"
)


def read_state(conn, source: str) -> SourceState:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {COLUMNS} FROM ingest.source_state WHERE source = %s", (source,))
        row = cur.fetchone()
    return SourceState(source, *row) if row else SourceState(source)


def record_kick_off(conn, source: str, status_url: str, request: str, *, full_refresh: bool) -> None:
    _upsert(
        conn,
        source,
        export_status_url=status_url,
        export_request=request,
        export_kicked_off_at="now()",
        export_full_refresh=full_refresh,
        export_progress=None,
        export_transaction_time=None,
        export_expires_at=None,
        export_delivery=None,
    )


def record_manifest(conn, source: str, transaction_time: str, expires_at: datetime | None) -> None:
    _upsert(
        conn,
        source,
        export_transaction_time=transaction_time,
        export_expires_at=expires_at,
        export_progress="manifest ready",
    )


def record_downloaded(conn, source: str, delivery: str) -> None:
    _upsert(conn, source, export_delivery=delivery, export_progress="downloaded")


def forget_export(conn, source: str) -> None:
    """The export is gone (expired, cancelled): the next run kicks off a new one from the same `_since`."""
    _upsert(
        conn,
        source,
        export_status_url=None,
        export_request=None,
        export_kicked_off_at=None,
        export_full_refresh=None,
        export_progress=None,
        export_transaction_time=None,
        export_expires_at=None,
        export_delivery=None,
    )


def commit_export(cur, source: str, transaction_time: str, batch_id: str) -> None:
    """Inside the batch's own transaction: `_since` moves only if the batch commits."""
    cur.execute(
        """
        INSERT INTO ingest.source_state (source, since, since_batch_id) VALUES (%s, %s, %s)
        ON CONFLICT (source) DO UPDATE SET
            since = excluded.since, since_batch_id = excluded.since_batch_id,
            export_status_url = NULL, export_request = NULL, export_kicked_off_at = NULL,
            export_full_refresh = NULL, export_progress = NULL, export_transaction_time = NULL,
            export_expires_at = NULL, export_delivery = NULL, updated_at = now()
        """,
        (source, transaction_time, batch_id),
    )


def _upsert(conn, source: str, **columns) -> None:
    names = list(columns)
    values = [columns[n] for n in names]
    placeholders = ["now()" if v == "now()" else "%s" for v in values]
    params = [v for v in values if v != "now()"]
    updates = ", ".join(f"{n} = excluded.{n}" for n in names)
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO ingest.source_state (source, {', '.join(names)}) VALUES (%s, {', '.join(placeholders)}) "
            f"ON CONFLICT (source) DO UPDATE SET {updates}, updated_at = now()",
            (source, *params),
        )
