"""The Ingestion view's queries on a warehouse of ten years of batches: the overview and the batch page, timed as
the API server runs them (reader role, one pooled connection)."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta

from health_ingest.warehouse import monitoring

SOURCES = ("hospital_a", "hospital_b", "regional_claims", "snds_extract", "cms_rif")


def fill_warehouse(
    conn, *, batches: int = 100_000, years: int = 10, files_per_batch: int = 3, results_per_batch: int = 30
) -> None:
    """Batches spread evenly over the years up to now, across five sources: nine in ten committed, the others
    rejected or failed; each with its files, and every tenth with quarantined records and a failed expectation."""
    now = datetime.now(UTC)
    span = timedelta(days=365 * years).total_seconds()
    with conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO ingest.batches (batch_id, source, kind, status, started_at, finished_at, committed_at,
                                        commit_seq, rows_read, rows_loaded, rows_quarantined, key_id, hosting,
                                        step_seconds)
            SELECT md5('batch' || n)::uuid, (%(sources)s::text[])[1 + n %% 5],
                   CASE WHEN n %% 5 >= 2 THEN 'claims' ELSE 'fhir' END,
                   CASE WHEN n %% 10 = 3 THEN 'rejected' WHEN n %% 25 = 7 THEN 'failed' ELSE 'committed' END,
                   at, at + interval '40 seconds',
                   CASE WHEN n %% 10 <> 3 AND n %% 25 <> 7 THEN at + interval '40 seconds' END,
                   CASE WHEN n %% 10 <> 3 AND n %% 25 <> 7 THEN n END,
                   100000, 100000 - (n %% 5 = 3)::int * 50, (n %% 5 = 3)::int * 50, 'k1', 'on-premises',
                   '{"check": 4.0, "pseudonymise": 12.5, "stage": 9.1, "commit": 6.2, "elapsed": 40.0}'::jsonb
              FROM generate_series(1, %(batches)s) n,
                   LATERAL (SELECT %(now)s::timestamptz - make_interval(secs => %(span)s * (%(batches)s - n)
                                   / %(batches)s) AS at) t
            """,
            {"sources": list(SOURCES), "batches": batches, "now": now, "span": span},
        )
        cur.execute(
            """
            INSERT INTO ingest.batch_files (batch_id, file_no, file_name, resource_type, bytes, sha256, status,
                                            rows_read, rows_loaded, rows_quarantined)
            SELECT b.batch_id, f, 'part-' || f || '.ndjson', (ARRAY['Patient','Encounter','Condition'])[1 + f %% 3],
                   1000000, md5(b.batch_id::text || f), 'loaded', 30000, 30000, 0
              FROM ingest.batches b, generate_series(1, %s) f
            """,
            (files_per_batch,),
        )
        cur.execute(
            """
            INSERT INTO ingest.quarantine (batch_id, file_name, line_number, reason, message)
            SELECT b.batch_id, 'part-1.ndjson', q, (ARRAY['invalid_json','missing_id','bad_last_updated'])[1 + q %% 3],
                   'a reason without values'
              FROM ingest.batches b, generate_series(1, 50) q WHERE b.rows_quarantined > %s
            """,
            (0,),
        )
        cur.execute(
            """
            INSERT INTO ingest.dq_results (batch_id, table_name, expectation, category, severity, success,
                                           observed_value, checked_at)
            SELECT b.batch_id, 'fhir.patient', 'expect_column_values_to_not_be_null(c' || r || ')',
                   (ARRAY['conformance','completeness','plausibility'])[1 + r %% 3], 'error',
                   NOT (r = 1 AND b.status = 'rejected'),
                   jsonb_build_object('element_count', 1000, 'unexpected_count', (r = 1 AND b.status = 'rejected')::int,
                                      'unexpected_percent', 0.1, 'kwargs', '{}'::jsonb),
                   b.started_at + interval '30 seconds'
              FROM ingest.batches b, generate_series(1, %s) r
            """,
            (results_per_batch,),
        )
        cur.execute(
            """
            INSERT INTO ingest.deletions (batch_id, resource_type, id, found)
            SELECT b.batch_id, 'Encounter', 'deleted-' || d, d %% 2 = 0
              FROM ingest.batches b, generate_series(1, 10) d WHERE b.commit_seq %% %s = 0
            """,
            (50,),
        )
        cur.execute("SELECT setval('ingest.commit_seq', %s)", (batches,))
        cur.execute(
            "ANALYZE ingest.batches, ingest.batch_files, ingest.quarantine, ingest.dq_results, ingest.deletions"
        )
    if not conn.autocommit:
        conn.commit()


def measure_queries(url: str, *, repeats: int = 30) -> dict:
    """Milliseconds (median and slowest of `repeats`) of the overview's and the batch page's queries."""
    conn = monitoring.connect_as_reader(url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*), min(started_at) FROM ingest.batches")
        count, oldest = cur.fetchone()
        cur.execute(
            "SELECT batch_id::text FROM ingest.batches WHERE status = 'rejected' ORDER BY started_at DESC LIMIT %s",
            (repeats,),
        )
        rejected = [row[0] for row in cur.fetchall()]
    since = datetime.now(UTC) - timedelta(days=30)

    def overview() -> None:
        monitoring.sources_activity(conn, list(SOURCES))
        monitoring.daily_activity(conn, since)

    def batch_page(batch_id: str) -> None:
        monitoring.batch_record(conn, batch_id)

    timings = {
        "overview_ms": _timed([overview] * repeats),
        "batch_page_ms": _timed([lambda b=b: batch_page(b) for b in rejected]),
        "batches_list_ms": _timed([lambda: monitoring.list_batches(conn, limit=50)] * repeats),
        "consumers_feed_ms": _timed([lambda: monitoring.committed_feed(conn, limit=100)] * repeats),
    }
    conn.close()
    return {"batches": count, "oldest": oldest.isoformat(), **timings}


def _timed(calls) -> dict:
    seconds = []
    for call in calls:
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return {"median": round(1000 * statistics.median(seconds), 2), "max": round(1000 * max(seconds), 2)}
