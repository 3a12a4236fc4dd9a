"""Flat tables `flat.<view name>`: the repository's ViewDefinitions over `fhir.*`, refreshed per committed batch.

Each row also carries the resource it came from (`resource_id`), the person pseudonym (`patient_id`) and the
batch (`batch_id`); a refresh replaces the rows of the batch's resources, and a rebuild needs nothing but the
warehouse's JSONB.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from psycopg2.extras import Json, execute_values

from health_ingest.views.runner import ViewRunner

log = logging.getLogger(__name__)

PG_TYPES = {
    "integer": "bigint",
    "positiveInt": "bigint",
    "unsignedInt": "bigint",
    "integer64": "bigint",
    "decimal": "numeric",
    "boolean": "boolean",
}
FETCH = 2000


@dataclass(frozen=True)
class FlatView:
    name: str
    runner: ViewRunner

    @property
    def table(self) -> str:
        return self.name

    @property
    def source_table(self) -> str:
        return self.runner.resource_type.lower()

    def column_ddl(self) -> list[tuple[str, str]]:
        return [
            (c["name"], "jsonb" if c.get("collection") else PG_TYPES.get(c.get("type", ""), "text"))
            for c in self.runner.columns
        ]


def repository_views() -> list[FlatView]:
    return [FlatView(definition["name"], ViewRunner(definition)) for definition in _repository_definitions()]


def repository_view_names() -> list[str]:
    """The flat tables' names, without compiling their views."""
    return [definition["name"] for definition in _repository_definitions()]


def _repository_definitions() -> Iterator[dict]:
    folder = resources.files("health_ingest.views") / "definitions"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            yield json.loads(entry.read_text(encoding="utf-8"))


def refresh_batch(conn, batch_id: str, views: list[FlatView] | None = None) -> dict[str, int]:
    """Replace the flat rows of every resource this batch wrote; one transaction for all views, gated by the
    flat tables' quality suites: an error leaves every flat table as it was (and fails the refresh)."""
    from health_ingest.errors import BatchRejected
    from health_ingest.quality.policy import QualityPolicy
    from health_ingest.quality.suites import evaluate_tables, record_outcomes

    outcomes = []
    try:
        with _transaction(conn) as cur:
            written = {}
            for view in views or repository_views():
                if _source_exists(cur, view):
                    _ensure_table(cur, view)
                    written[view.name] = _load(cur, view, "WHERE batch_id = %s", (batch_id,), replace=True)
                    cur.execute(  # what the batch deleted leaves its flat tables too
                        f"DELETE FROM flat.{view.table} WHERE resource_id IN (SELECT id FROM ingest.deletions "
                        "WHERE batch_id = %s AND lower(resource_type) = %s)",
                        (batch_id, view.source_table),
                    )
            cur.execute("SELECT source FROM ingest.batches WHERE batch_id = %s", (batch_id,))
            source = (cur.fetchone() or ("",))[0]
            tables = [f"flat.{view.table}" for view in views or repository_views() if view.name in written]
            outcomes = evaluate_tables(cur, batch_id, source, tables, QualityPolicy())
            failed = [o for o in outcomes if not o.success and o.severity == "error"]
            if failed:
                raise BatchRejected(
                    f"flat tables of batch {batch_id} not refreshed: " + "; ".join(o.describe() for o in failed),
                    evidence=outcomes,
                )
            record_outcomes(cur, batch_id, outcomes)
    except BatchRejected:
        with _transaction(conn) as cur:  # the evidence outlives the rollback
            record_outcomes(cur, batch_id, outcomes)
        raise
    return written


def rebuild(conn, views: list[FlatView] | None = None) -> dict[str, int]:
    """Rebuild every flat table from the JSONB of the warehouse (no source is fetched again); the flat suites
    check every rebuilt row, and an error leaves the tables as they were."""
    from health_ingest.errors import BatchRejected
    from health_ingest.quality.policy import QualityPolicy
    from health_ingest.quality.suites import evaluate_tables

    with _transaction(conn) as cur:
        written = {}
        for view in views or repository_views():
            cur.execute(f"DROP TABLE IF EXISTS flat.{view.table}")
            if _source_exists(cur, view):
                _ensure_table(cur, view)
                written[view.name] = _load(cur, view, "", (), replace=False)
        tables = [f"flat.{view.table}" for view in views or repository_views() if view.name in written]
        outcomes = evaluate_tables(cur, None, "", tables, QualityPolicy())
        errors = [o for o in outcomes if not o.success and o.severity == "error"]
        if errors:
            raise BatchRejected("flat tables not rebuilt: " + "; ".join(o.describe() for o in errors))
    return written


@contextmanager
def _transaction(conn) -> Iterator:
    """One transaction whatever the connection's mode (server-side cursors need one)."""
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            yield cur
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = autocommit


# --- implementation details -------------------------------------------------------------------


def _source_exists(cur, view: FlatView) -> bool:
    cur.execute("SELECT to_regclass(%s)", (f"fhir.{view.source_table}",))
    return cur.fetchone()[0] is not None


def _ensure_table(cur, view: FlatView) -> None:
    """Create the table, or recreate it when its ViewDefinition's columns changed (a rebuild follows)."""
    from health_ingest.warehouse.merge import must_create_table

    must_create_table(cur, f"flat.{view.table}")  # waits while another refresh creates tables, then looks again
    wanted = [("resource_id", "text"), ("patient_id", "text"), ("batch_id", "uuid"), *view.column_ddl()]
    cur.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'flat' AND table_name = %s "
        "ORDER BY ordinal_position",
        (view.table,),
    )
    existing = [row[0] for row in cur.fetchall()]
    if existing == [name for name, _ in wanted]:
        return
    if existing:
        log.warning("flat.%s: columns changed, the table is rebuilt", view.table)
        cur.execute(f"DROP TABLE flat.{view.table}")
    columns = ", ".join(f'"{name}" {kind}' for name, kind in wanted)
    cur.execute(f"CREATE TABLE flat.{view.table} ({columns})")
    cur.execute(f"CREATE INDEX ON flat.{view.table} (resource_id)")
    cur.execute(f"CREATE INDEX ON flat.{view.table} (patient_id)")
    cur.execute(f"CREATE INDEX ON flat.{view.table} (batch_id)")  # a refresh's suite reads its batch's rows
    cur.execute(f"GRANT SELECT ON flat.{view.table} TO health_ingest_reader")
    if not existing:
        return
    _load(cur, view, "", (), replace=False)


def _load(cur, view: FlatView, where: str, params: tuple, *, replace: bool) -> int:
    names = [name for name, _ in view.column_ddl()]
    collections = {c["name"] for c in view.runner.columns if c.get("collection")}
    insert = (
        f"INSERT INTO flat.{view.table} (resource_id, patient_id, batch_id, {', '.join(map(_quote, names))}) VALUES %s"
    )
    reader = cur.connection.cursor(name=f"flat_{view.table}")  # server-side: never the whole table in memory
    reader.itersize = FETCH
    reader.execute(f"SELECT id, patient_id, batch_id::text, resource FROM fhir.{view.source_table} {where}", params)
    written = 0
    while batch := reader.fetchmany(FETCH):
        if replace:
            cur.execute(f"DELETE FROM flat.{view.table} WHERE resource_id = ANY(%s)", ([row[0] for row in batch],))
        values = []
        for resource_id, patient_id, batch_id, resource in batch:
            for row in view.runner.rows(resource):
                cells = [Json(row[n]) if n in collections else _cell(row[n]) for n in names]
                values.append((resource_id, patient_id, batch_id, *cells))
        if values:
            execute_values(cur, insert, values, page_size=1000)
            written += len(values)
    reader.close()
    return written


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def _quote(name: str) -> str:
    return f'"{name}"'
