"""Read-only queries behind the Ingestion view: sources' last batches, daily activity, one batch's record, the
committed feed. They run as `health_ingest_reader` (counts, reasons and quality results, never a record's values),
and each one is served by an index, so a page costs the same on ten years of batches as on ten."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

READER_ROLE = "health_ingest_reader"


@dataclass(frozen=True)
class BatchSummary:
    batch_id: str
    source: str
    kind: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    committed_at: datetime | None
    commit_seq: int | None
    rows_read: int
    rows_loaded: int
    rows_quarantined: int
    rows_deleted: int

    @property
    def seconds(self) -> float | None:
        return (self.finished_at - self.started_at).total_seconds() if self.finished_at else None


@dataclass(frozen=True)
class SourceActivity:
    """A declared source's latest batch and latest committed batch (either may be missing)."""

    source: str
    last: BatchSummary | None
    last_committed: BatchSummary | None


@dataclass(frozen=True)
class DayActivity:
    day: datetime
    source: str
    batches: int
    committed: int
    rejected: int
    failed: int
    rows_read: int
    rows_loaded: int
    rows_quarantined: int
    max_seconds: float | None
    total_seconds: float


@dataclass(frozen=True)
class FileCounts:
    file_no: int
    file_name: str
    resource_type: str | None
    status: str
    skip_reason: str | None
    bytes: int
    rows_read: int
    rows_loaded: int
    rows_quarantined: int


@dataclass(frozen=True)
class QuarantineReason:
    reason: str
    file_name: str
    records: int


@dataclass(frozen=True)
class QualityResult:
    table_name: str
    expectation: str
    category: str
    severity: str
    success: bool
    observed: dict[str, Any]
    checked_at: datetime


@dataclass(frozen=True)
class PrivacyCheck:
    check_name: str
    k: int
    classes: int
    classes_below_k: int
    records_below_k: int
    action: str
    passed: bool


@dataclass(frozen=True)
class BatchRecord:
    """Everything the batch page shows."""

    summary: BatchSummary
    key_id: str
    hosting: str | None  # the jurisdiction guard's decision, as recorded when the batch opened
    error: str | None
    step_seconds: dict[str, float]
    rekeyed_from: str | None
    airflow_dag_id: str | None
    airflow_run_id: str | None
    airflow_task_id: str | None
    airflow_try_number: int | None
    airflow_map_index: int | None
    files: list[FileCounts] = field(default_factory=list)
    deleted_by_type: dict[str, int] = field(default_factory=dict)  # a Bulk export's deletions that removed a row
    quarantine: list[QuarantineReason] = field(default_factory=list)
    quality: list[QualityResult] = field(default_factory=list)
    privacy: list[PrivacyCheck] = field(default_factory=list)


@dataclass(frozen=True)
class FeedEntry:
    """A committed batch as consumers read it: its commit_seq and the rows it wrote per type or table."""

    summary: BatchSummary
    rows_by_type: dict[str, int]


def connect_as_reader(url: str):
    """A read-only connection with the reader role's rights, whoever the configured login is."""
    from health_ingest.warehouse.connection import connect

    conn = connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"SET ROLE {READER_ROLE}")
        cur.execute("SET default_transaction_read_only = on")
    return conn


def sources_activity(conn, sources: list[str]) -> list[SourceActivity]:
    """Per source, in the order given: its latest batch and its latest committed batch (two index probes each)."""
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT s.name, {_columns("l")}, {_columns("c")}
              FROM unnest(%s::text[]) WITH ORDINALITY AS s(name, position)
              LEFT JOIN LATERAL (
                    SELECT {_columns("b", plain=True)} FROM ingest.batches b WHERE b.source = s.name
                     ORDER BY b.started_at DESC LIMIT 1
                   ) l ON true
              LEFT JOIN LATERAL (
                    SELECT {_columns("b", plain=True)} FROM ingest.batches b
                     WHERE b.source = s.name AND b.status = 'committed'
                     ORDER BY b.committed_at DESC LIMIT 1
                   ) c ON true
             ORDER BY s.position
            """,
            (list(sources),),
        )
        width = len(_SUMMARY_COLUMNS)
        return [
            SourceActivity(row[0], _summary(row[1 : 1 + width]), _summary(row[1 + width :])) for row in cur.fetchall()
        ]


def daily_activity(conn, since: datetime) -> list[DayActivity]:
    """Batches started since a time, per UTC day and source: counts by status, rows, durations."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT date_trunc('day', started_at AT TIME ZONE 'UTC') AS day, source, count(*),
                   count(*) FILTER (WHERE status = 'committed'), count(*) FILTER (WHERE status = 'rejected'),
                   count(*) FILTER (WHERE status = 'failed'),
                   sum(rows_read)::bigint, sum(rows_loaded)::bigint, sum(rows_quarantined)::bigint,
                   max(extract(epoch FROM finished_at - started_at))::float8,
                   coalesce(sum(extract(epoch FROM finished_at - started_at)), 0)::float8
              FROM ingest.batches
             WHERE started_at >= %s
             GROUP BY 1, 2 ORDER BY 1, 2
            """,
            (since,),
        )
        return [DayActivity(*row) for row in cur.fetchall()]


def list_batches(
    conn, *, source: str | None = None, status: str | None = None, before: datetime | None = None, limit: int = 50
) -> list[BatchSummary]:
    """Newest first; `before` (the last row's `started_at`) pages back through the years."""
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT {_columns("b")} FROM ingest.batches b
             WHERE (%(source)s::text IS NULL OR b.source = %(source)s)
               AND (%(status)s::text IS NULL OR b.status = %(status)s)
               AND (%(before)s::timestamptz IS NULL OR b.started_at < %(before)s)
             ORDER BY b.started_at DESC LIMIT %(limit)s
            """,
            {"source": source, "status": status, "before": before, "limit": limit},
        )
        return [_summary(row) for row in cur.fetchall()]


def batch_record(conn, batch_id: str) -> BatchRecord | None:
    """One batch with its files, quarantine reasons, quality results and privacy checks."""
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT {_columns("b")}, b.key_id, b.hosting, b.error, b.step_seconds, b.rekeyed_from,
                   b.airflow_dag_id, b.airflow_run_id, b.airflow_task_id, b.airflow_try_number,
                   b.airflow_map_index
              FROM ingest.batches b WHERE b.batch_id = %s
            """,
            (batch_id,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        width = len(_SUMMARY_COLUMNS)
        key_id, hosting, error, steps, rekeyed_from, dag_id, run_id, task_id, try_number, map_index = row[width:]
        cur.execute(
            """
            SELECT file_no, file_name, resource_type, status, skip_reason, bytes, rows_read, rows_loaded,
                   rows_quarantined
              FROM ingest.batch_files WHERE batch_id = %s ORDER BY file_no
            """,
            (batch_id,),
        )
        files = [FileCounts(*r) for r in cur.fetchall()]
        cur.execute(
            """
            SELECT resource_type, count(*) FILTER (WHERE found) FROM ingest.deletions WHERE batch_id = %s
             GROUP BY resource_type
            """,
            (batch_id,),
        )
        deleted = {resource_type: count for resource_type, count in cur.fetchall() if count}
        cur.execute(
            """
            SELECT reason, file_name, count(*) FROM ingest.quarantine WHERE batch_id = %s
             GROUP BY reason, file_name ORDER BY reason, file_name
            """,
            (batch_id,),
        )
        quarantine = [QuarantineReason(*r) for r in cur.fetchall()]
        quality = quality_results(conn, batch_id)
        cur.execute(
            """
            SELECT check_name, k, classes, classes_below_k, records_below_k, action, passed
              FROM ingest.privacy_checks WHERE batch_id = %s ORDER BY check_name
            """,
            (batch_id,),
        )
        privacy = [PrivacyCheck(*r) for r in cur.fetchall()]
    return BatchRecord(
        summary=_summary(row[:width]),
        key_id=key_id,
        hosting=hosting,
        error=error,
        step_seconds={k: float(v) for k, v in (steps or {}).items() if isinstance(v, int | float)},
        rekeyed_from=rekeyed_from,
        airflow_dag_id=dag_id,
        airflow_run_id=run_id,
        airflow_task_id=task_id,
        airflow_try_number=try_number,
        airflow_map_index=map_index,
        files=files,
        deleted_by_type=deleted,
        quarantine=quarantine,
        quality=quality,
        privacy=privacy,
    )


def quality_results(conn, batch_id: str) -> list[QualityResult]:
    """A batch's expectation results, failed first, then by table and category."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT table_name, expectation, category, severity, success, observed_value, checked_at
              FROM ingest.dq_results WHERE batch_id = %s
             ORDER BY success, table_name, category, result_id
            """,
            (batch_id,),
        )
        return [
            QualityResult(t, e, c, s, ok, observed if isinstance(observed, dict) else json.loads(observed or "{}"), at)
            for t, e, c, s, ok, observed, at in cur.fetchall()
        ]


def committed_feed(conn, *, after: int | None = None, limit: int = 50) -> list[FeedEntry]:
    """The newest committed batches (or those after a watermark, oldest first), with rows written per type."""
    newest_first = after is None
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT {_columns("b")},
                   (SELECT coalesce(jsonb_object_agg(t.resource_type, t.rows), '{{}}'::jsonb)
                      FROM (SELECT coalesce(f.resource_type, f.file_name) AS resource_type,
                                   sum(f.rows_loaded)::bigint AS rows
                              FROM ingest.batch_files f
                             WHERE f.batch_id = b.batch_id AND f.status = 'loaded'
                             GROUP BY 1) t)
              FROM ingest.batches b
             WHERE b.commit_seq IS NOT NULL AND b.status = 'committed'
               AND (%(after)s::bigint IS NULL OR b.commit_seq > %(after)s)
             ORDER BY b.commit_seq {"DESC" if newest_first else "ASC"} LIMIT %(limit)s
            """,
            {"after": after, "limit": limit},
        )
        width = len(_SUMMARY_COLUMNS)
        return [FeedEntry(_summary(row[:width]), {k: int(v) for k, v in row[width].items()}) for row in cur.fetchall()]


def freshness(activity: SourceActivity, expect_every: timedelta | None, now: datetime) -> str:
    """fresh: committed within the cadence; late: batches came but none committed within it; quiet: no batch
    at all within it; `no cadence` when the source declares none."""
    if expect_every is None:
        return "no cadence"
    committed = activity.last_committed
    if committed is not None and committed.committed_at and now - committed.committed_at <= expect_every:
        return "fresh"
    if activity.last is not None and now - activity.last.started_at <= expect_every:
        return "late"
    return "quiet"


# --- implementation details -------------------------------------------------------------------

_SUMMARY_COLUMNS = (
    "batch_id::text",
    "source",
    "kind",
    "status",
    "started_at",
    "finished_at",
    "committed_at",
    "commit_seq",
    "rows_read",
    "rows_loaded",
    "rows_quarantined",
    "rows_deleted",
)


def _columns(alias: str, *, plain: bool = False) -> str:
    """The summary's columns of a table alias; `plain` names them as they are, for a subquery to select."""
    if plain:
        return ", ".join(f"{alias}.{column.split('::')[0]}" for column in _SUMMARY_COLUMNS)
    return ", ".join(f"{alias}.{column}" for column in _SUMMARY_COLUMNS)


def _summary(values) -> BatchSummary | None:
    if values[0] is None:
        return None
    return BatchSummary(*values)
