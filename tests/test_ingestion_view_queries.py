"""The Ingestion view's warehouse queries: served by indexes on ten years of batches, read with the reader role's
rights only, and the freshness they report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
from health_ingest.bench.ingestion_view import SOURCES, fill_warehouse
from health_ingest.warehouse import monitoring

pytestmark = pytest.mark.integration

VIEW_TABLES = {"batches", "batch_files", "quarantine", "dq_results", "privacy_checks", "deletions"}


class ExplainingConnection:
    """Runs each query the view makes twice: explained first (its plan kept), then for real."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.plans: list[tuple[str, dict]] = []

    def cursor(self):
        return ExplainingCursor(self.conn.cursor(), self.plans)


class ExplainingCursor:
    def __init__(self, cur, plans) -> None:
        self.cur = cur
        self.plans = plans

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.cur.close()

    def execute(self, query, params=None) -> None:
        self.cur.execute("EXPLAIN (FORMAT JSON) " + query, params)
        self.plans.append((query, self.cur.fetchone()[0][0]["Plan"]))
        self.cur.execute(query, params)

    def fetchone(self):
        return self.cur.fetchone()

    def fetchall(self):
        return self.cur.fetchall()


def seq_scans(plan: dict) -> list[str]:
    own = (
        [plan["Relation Name"]] if plan["Node Type"] == "Seq Scan" and plan.get("Relation Name") in VIEW_TABLES else []
    )
    return own + [name for child in plan.get("Plans", []) for name in seq_scans(child)]


def test_every_query_of_the_view_uses_an_index_on_ten_years_of_batches(db, warehouse_url):
    fill_warehouse(db, batches=100_000, files_per_batch=1, results_per_batch=2)
    with db.cursor() as cur:
        cur.execute("SELECT batch_id::text FROM ingest.batches WHERE status = 'rejected' ORDER BY started_at LIMIT 1")
        (rejected,) = cur.fetchone()
        cur.execute("SELECT max(started_at) FROM ingest.batches")
        (newest,) = cur.fetchone()
    reader = monitoring.connect_as_reader(warehouse_url)
    conn = ExplainingConnection(reader)

    activity = monitoring.sources_activity(conn, [*SOURCES, "never_delivered"])
    daily = monitoring.daily_activity(conn, datetime.now(UTC) - timedelta(days=30))
    record = monitoring.batch_record(conn, rejected)
    listed = monitoring.list_batches(conn, source="snds_extract", status="rejected", before=newest, limit=50)
    feed = monitoring.committed_feed(conn, limit=100)
    after = monitoring.committed_feed(conn, after=99_000, limit=100)
    everything = monitoring.list_batches(conn, limit=50)
    reader.close()

    assert len(conn.plans) >= 10
    assert {query.split()[0] for query, _ in conn.plans} == {"SELECT"}
    assert [(query.strip().splitlines()[0], seq_scans(plan)) for query, plan in conn.plans if seq_scans(plan)] == []
    # and the queries read what the pages show
    assert [a.source for a in activity] == [*SOURCES, "never_delivered"]
    assert activity[-1].last is None and all(a.last_committed for a in activity[:-1])
    assert 25 * 30 <= sum(d.batches for d in daily) <= 30 * 31
    assert record.summary.status == "rejected" and [q.reason for q in record.quarantine]
    assert record.quality[0].success is False, "failed expectations come first"
    assert listed and {(b.source, b.status) for b in listed} == {("snds_extract", "rejected")}
    assert [e.summary.commit_seq for e in feed] == sorted((e.summary.commit_seq for e in feed), reverse=True)
    assert feed[0].rows_by_type and after[0].summary.commit_seq > 99_000
    assert everything[0].started_at == newest


def test_the_view_reads_counts_and_reasons_never_values_or_escrow(db, warehouse_url):
    fill_warehouse(db, batches=100, files_per_batch=1, results_per_batch=1)
    reader = monitoring.connect_as_reader(warehouse_url)
    with reader.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == ("health_ingest_reader",)
        cur.execute("SELECT reason, count(*) FROM ingest.quarantine GROUP BY reason")
        assert cur.fetchall()
        for forbidden in (
            "SELECT message FROM ingest.quarantine",
            "SELECT line_number FROM ingest.quarantine",
            "SELECT token FROM escrow.identifiers",
            "SELECT delivery FROM ingest.batches",
            "SELECT dq_report FROM ingest.batches",
        ):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute(forbidden)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            cur.execute("DELETE FROM ingest.dq_results")
    reader.close()


def test_a_source_is_fresh_late_or_quiet_against_its_expected_cadence():
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)

    def batch(status: str, hours_ago: float) -> monitoring.BatchSummary:
        at = now - timedelta(hours=hours_ago)
        committed = at if status == "committed" else None
        return monitoring.BatchSummary("b", "s", "fhir", status, at, at, committed, None, 0, 0, 0, 0)

    daily = timedelta(hours=26)
    fresh = monitoring.SourceActivity("s", batch("committed", 3), batch("committed", 3))
    late = monitoring.SourceActivity("s", batch("rejected", 2), batch("committed", 50))
    quiet = monitoring.SourceActivity("s", batch("committed", 30), batch("committed", 30))
    never = monitoring.SourceActivity("s", None, None)
    assert [monitoring.freshness(a, daily, now) for a in (fresh, late, quiet, never)] == [
        "fresh",
        "late",
        "quiet",
        "quiet",
    ]
    assert monitoring.freshness(fresh, None, now) == "no cadence"
