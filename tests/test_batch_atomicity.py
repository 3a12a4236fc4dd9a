"""A batch commits whole or not at all; re-deliveries replace rather than duplicate."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE, sample_line_counts
from health_ingest.errors import LoadError
from health_ingest.pipeline import run_fhir_batch
from health_ingest.warehouse import merge

pytestmark = pytest.mark.integration


def _table_counts(db) -> dict[str, int]:
    with db.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'fhir'")
        tables = sorted(row[0] for row in cur.fetchall())
        counts = {}
        for table in tables:
            cur.execute(f"SELECT count(*) FROM fhir.{table}")
            counts[table] = cur.fetchone()[0]
    return counts


def test_redelivering_the_sample_replaces_rows_instead_of_duplicating(db, smart_source):
    first = run_fhir_batch(SAMPLE, smart_source)
    after_first = _table_counts(db)
    second = run_fhir_batch(SAMPLE, smart_source)

    assert _table_counts(db) == after_first == {t.lower(): n for t, n in sample_line_counts().items()}
    assert first.batch_id != second.batch_id and second.commit_seq > first.commit_seq
    with db.cursor() as cur:
        cur.execute("SELECT DISTINCT batch_id::text FROM fhir.patient")
        assert cur.fetchall() == [(second.batch_id,)]


def test_an_older_version_does_not_overwrite_a_newer_one(tmp_path, db, smart_source):
    def deliver(name: str, updated: str, gender: str) -> None:
        folder = tmp_path / name
        folder.mkdir()
        resource = {"resourceType": "Patient", "id": "p1", "gender": gender, "meta": {"lastUpdated": updated}}
        (folder / "Patient.ndjson").write_text(json.dumps(resource) + "\n")
        run_fhir_batch(folder, smart_source)

    deliver("newer", "2024-06-01T00:00:00Z", "female")
    deliver("older", "2023-06-01T00:00:00Z", "male")
    with db.cursor() as cur:
        cur.execute("SELECT resource->>'gender' FROM fhir.patient")
        assert cur.fetchall() == [("female",)]


def test_a_failure_during_commit_leaves_nothing_of_the_batch(db, smart_source, monkeypatch):
    real_merge = merge.merge_resource_type
    merged = []

    def merge_then_crash(cur, batch_id, resource_type, *args):
        if len(merged) == 3:
            raise RuntimeError("disk full")
        merged.append(resource_type)
        return real_merge(cur, batch_id, resource_type, *args)

    monkeypatch.setattr(merge, "merge_resource_type", merge_then_crash)
    with pytest.raises(LoadError, match="RuntimeError while merging"):
        run_fhir_batch(SAMPLE, smart_source)

    assert len(merged) == 3
    assert all(count == 0 for count in _table_counts(db).values())
    with db.cursor() as cur:
        cur.execute("SELECT status FROM ingest.batches")
        assert cur.fetchall() == [("failed",)]
        cur.execute("SELECT count(*) FROM ingest.quarantine")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'ingest_staging'")
        assert cur.fetchone()[0] == 0, "the failed batch's staging tables are gone"

    monkeypatch.setattr(merge, "merge_resource_type", real_merge)
    assert run_fhir_batch(SAMPLE, smart_source).rows_loaded == 7160


def test_a_batch_left_loading_by_a_dead_process_is_marked_failed_by_the_next_run(db, smart_source):
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO ingest.batches (batch_id, source, kind, status, key_id) "
            "VALUES (gen_random_uuid(), %s, 'fhir', 'loading', 'k1')",
            (smart_source.name,),
        )
    run_fhir_batch(SAMPLE / "Patient.000.ndjson", smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT status, error FROM ingest.batches ORDER BY started_at")
        (old_status, old_error), (new_status, _) = cur.fetchall()
    assert (old_status, new_status) == ("failed", "committed")
    assert old_error.startswith("abandoned")


def test_a_file_staged_in_many_parts_loads_the_same(db, smart_source, monkeypatch):
    """Byte ranges of about 16 KiB, each its own spool part and COPY: the sample loads exactly as in one piece."""
    import health_ingest.encoding as encoding
    import health_ingest.pipeline as pipeline

    monkeypatch.setattr(encoding, "CHUNK_BYTES", 1 << 14)
    monkeypatch.setattr(pipeline, "SPOOL_BYTES", 1)
    result = run_fhir_batch(SAMPLE, smart_source)
    assert result.rows_quarantined == 0
    assert _table_counts(db) == {t.lower(): n for t, n in sample_line_counts().items()}
    with db.cursor() as cur:
        cur.execute(
            "SELECT resource_type, rows_read, rows_loaded FROM ingest.batch_files WHERE resource_type IS NOT NULL"
        )
        assert {(t, read) for t, read, loaded in cur.fetchall() if read == loaded} == set(sample_line_counts().items())
