"""The life of a batch row in `ingest.batches`: loading, then committed, rejected or failed."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime

from health_ingest import config

SOURCE_LOCK_PREFIX = "health_ingest:source:"
TABLE_LOCK_PREFIX = "health_ingest:table:"
COMMIT_LOCK = 0x436F6D6D  # serialises commits so that commit_seq order is commit order
NOTIFY_CHANNEL = "health_ingest_batches"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRow:
    batch_id: str
    source: str
    kind: str
    status: str
    started_at: datetime
    committed_at: datetime | None
    rows_read: int
    rows_loaded: int
    rows_quarantined: int
    key_id: str
    error: str | None
    dq_report: str | None
    delivery: str | None = None
    failed_step: str | None = None


def lock_source(conn, source: str) -> None:
    """One batch per source at a time: a second run waits for the first to finish, and says what it waits for. The
    lock belongs to the session, so the server releases it as soon as the process holding it is gone."""
    key = SOURCE_LOCK_PREFIX + source
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,))
        if cur.fetchone()[0]:
            return
        cur.execute(
            """
            SELECT a.pid, a.state, now() - a.backend_start,
                   (SELECT b.batch_id::text FROM ingest.batches b
                     WHERE b.source = %s AND b.status = 'loading' ORDER BY b.started_at DESC LIMIT 1)
              FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objid = hashtext(%s)::oid
            """,
            (source, key),
        )
        holder = cur.fetchone()
        if holder:
            log.warning(
                "source %s: waiting for batch %s, still loading in another process (server process %s, %s, "
                "connected for %s); one batch per source runs at a time",
                source,
                holder[3] or "(not yet recorded)",
                holder[0],
                holder[1],
                str(holder[2]).split(".")[0],
            )
        cur.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))


def lock_new_tables(cur, tables: list[str]) -> None:
    """Before a load transaction creates tables, lock those that do not exist yet, in name order: a batch of another
    source creating the same table waits for this one to commit, then finds it (instead of failing on the catalog's
    duplicate key), and two batches never wait for each other."""
    for table in sorted(set(tables)):
        cur.execute("SELECT to_regclass(%s) IS NULL", (table,))
        if cur.fetchone()[0]:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE_LOCK_PREFIX + table,))


def unlock_source(conn, source: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(hashtext(%s))", (SOURCE_LOCK_PREFIX + source,))


def fail_abandoned_batches(conn, source: str) -> list[str]:
    """Holding the source lock, any batch still 'loading' belongs to a process that died."""
    with conn.cursor() as cur:
        cur.execute(
            """
            UPDATE ingest.batches SET status = 'failed', finished_at = now(),
                   error = 'abandoned: the process loading it stopped before it finished; nothing was committed'
             WHERE source = %s AND status = 'loading'
            RETURNING batch_id::text
            """,
            (source,),
        )
        return [row[0] for row in cur.fetchall()]


def open_batch(conn, *, source: str, kind: str, key_id: str, delivery: str, hosting: str) -> str:
    batch_id = str(uuid.uuid4())
    task = airflow_task()
    with conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO ingest.batches (batch_id, source, kind, status, key_id, delivery, hosting,
                                        airflow_dag_id, airflow_run_id, airflow_task_id, airflow_try_number,
                                        airflow_map_index)
            VALUES (%s, %s, %s, 'loading', %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (batch_id, source, kind, key_id, delivery, hosting, *task),
        )
    return batch_id


def airflow_task() -> tuple[str | None, str | None, str | None, int | None, int | None]:
    """(dag id, run id, task id, try number, map index) of the Airflow task running this process, from the
    variables Airflow exports to its task processes; all None outside Airflow (the CLI, the bench). The UI links a
    batch to its run and task log with them."""
    return (
        os.environ.get("AIRFLOW_CTX_DAG_ID") or None,
        os.environ.get("AIRFLOW_CTX_DAG_RUN_ID") or None,
        os.environ.get("AIRFLOW_CTX_TASK_ID") or None,
        _integer(os.environ.get("AIRFLOW_CTX_TRY_NUMBER")),
        _integer(os.environ.get(config.ENV_AIRFLOW_MAP_INDEX)) if os.environ.get("AIRFLOW_CTX_DAG_ID") else None,
    )


def _integer(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def mark_committed(
    cur,
    batch_id: str,
    *,
    rows_read: int,
    rows_loaded: int,
    rows_quarantined: int,
    input_sha256: str,
    step_seconds: dict[str, float],
    privacy_removed: dict[str, dict[str, int]] | None = None,
) -> int:
    """Inside the load transaction: the batch becomes visible to consumers at the same instant as its rows."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (COMMIT_LOCK,))
    cur.execute(
        """
        UPDATE ingest.batches
           SET status = 'committed', committed_at = clock_timestamp(), finished_at = clock_timestamp(),
               commit_seq = nextval('ingest.commit_seq'),
               rows_read = %s, rows_loaded = %s, rows_quarantined = %s, input_sha256 = %s, step_seconds = %s,
               privacy_removed = %s
         WHERE batch_id = %s AND status = 'loading'
        RETURNING commit_seq, source
        """,
        (
            rows_read,
            rows_loaded,
            rows_quarantined,
            input_sha256,
            json.dumps(step_seconds),
            json.dumps(privacy_removed or {}),
            batch_id,
        ),
    )
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("the batch row is no longer 'loading'; refusing to commit over it")
    commit_seq, source = row
    cur.execute(
        "SELECT pg_notify(%s, json_build_object('batch_id', %s::text, 'source', %s::text, 'commit_seq', %s)::text)",
        (NOTIFY_CHANNEL, batch_id, source, commit_seq),
    )
    return commit_seq


def mark_failed(
    conn,
    batch_id: str,
    error: str,
    *,
    status: str = "failed",
    rows_read: int = 0,
    rows_quarantined: int = 0,
    failed_step: str | None = None,
) -> None:
    """After the rollback: the batch keeps what its reader saw (read, quarantined; nothing loaded) and where it
    stopped, so that the operator sees the delivery's true size."""
    with conn.cursor() as cur:
        cur.execute(
            """
            UPDATE ingest.batches
               SET status = %s, finished_at = now(), error = %s, rows_read = %s, rows_loaded = 0,
                   rows_quarantined = %s, failed_step = %s
             WHERE batch_id = %s
            """,
            (status, error[:2000], rows_read, rows_quarantined, failed_step, batch_id),
        )


def recent_batches(conn, limit: int = 20, source: str | None = None) -> list[BatchRow]:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT batch_id::text, source, kind, status, started_at, committed_at,
                   rows_read, rows_loaded, rows_quarantined, key_id, error, dq_report, delivery, failed_step
              FROM ingest.batches
             WHERE %(source)s::text IS NULL OR source = %(source)s
             ORDER BY started_at DESC
             LIMIT %(limit)s
            """,
            {"source": source, "limit": limit},
        )
        return [BatchRow(*row) for row in cur.fetchall()]


def counts_by_type(conn, batch_id: str) -> list[tuple[str, int, int, int]]:
    """(resource type, read, loaded, quarantined) of one batch, from its recorded files."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT resource_type, sum(rows_read)::bigint, sum(rows_loaded)::bigint, sum(rows_quarantined)::bigint
              FROM ingest.batch_files
             WHERE batch_id = %s AND status = 'loaded'
             GROUP BY resource_type ORDER BY resource_type
            """,
            (batch_id,),
        )
        return cur.fetchall()
