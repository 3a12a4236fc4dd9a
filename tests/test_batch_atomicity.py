"""A batch commits whole or not at all; re-deliveries replace rather than duplicate."""

from __future__ import annotations

import contextlib
import json

import pytest
from conftest import SAMPLE, sample_line_counts
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.errors import LoadError
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
    real_insert = merge.insert_all  # the tables are new: their rows go in before their keys
    merged = []

    def merge_then_crash(cur, batch_id, table, *args):
        if len(merged) == 3:
            raise RuntimeError("disk full")
        merged.append(table)
        return real_insert(cur, batch_id, table, *args)

    monkeypatch.setattr(merge, "insert_all", merge_then_crash)
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

    monkeypatch.setattr(merge, "insert_all", real_insert)
    assert run_fhir_batch(SAMPLE, smart_source).rows_loaded == 7160


def test_a_table_new_to_the_warehouse_gets_its_key_and_indexes_after_its_rows(db, smart_source, monkeypatch):
    """The first delivery of a type writes its rows into a bare table, then builds its key and indexes, named as the
    warehouse names them. When the key cannot be built (an id twice), the type is merged again by the upsert rules."""
    real_insert = merge.insert_all
    real_index = merge.index_new_table
    built = []

    def insert_patients_twice(cur, batch_id, table, *args):
        if table == "patient":
            real_insert(cur, batch_id, table, *args)
        return real_insert(cur, batch_id, table, *args)

    def index(cur, table):
        built.append((table, real_index(cur, table)))
        return built[-1][1]

    monkeypatch.setattr(merge, "insert_all", insert_patients_twice)
    monkeypatch.setattr(merge, "index_new_table", index)
    run_fhir_batch(SAMPLE, smart_source)

    expected = {t.lower(): n for t, n in sample_line_counts().items()}
    assert _table_counts(db) == expected
    assert sorted(built) == sorted((t, t != "patient") for t in expected), "every new table indexed at its end"
    with db.cursor() as cur:
        cur.execute("SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'fhir'")
        indexes = set(cur.fetchall())
        cur.execute(
            "SELECT conrelid::regclass::text FROM pg_constraint "
            "WHERE contype = 'p' AND connamespace = 'fhir'::regnamespace"
        )
        keys = {row[0] for row in cur.fetchall()}
    assert indexes == {(t, f"{t}_{suffix}") for t in expected for suffix in ("pkey", "patient", "batch")}
    assert keys == {f"fhir.{t}" for t in expected}
    monkeypatch.setattr(merge, "insert_all", real_insert)
    assert run_fhir_batch(SAMPLE, smart_source).rows_loaded == 7160, "the indexed tables take the next delivery"
    assert _table_counts(db) == expected


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
    from health_ingest.batch import fhir

    monkeypatch.setattr(fhir, "CHUNK_BYTES", 1 << 14)
    monkeypatch.setattr(fhir, "SPOOL_BYTES", 1)
    result = run_fhir_batch(SAMPLE, smart_source)
    assert result.rows_quarantined == 0
    assert _table_counts(db) == {t.lower(): n for t, n in sample_line_counts().items()}
    with db.cursor() as cur:
        cur.execute(
            "SELECT resource_type, rows_read, rows_loaded FROM ingest.batch_files WHERE resource_type IS NOT NULL"
        )
        assert {(t, read) for t, read, loaded in cur.fetchall() if read == loaded} == set(sample_line_counts().items())


def test_parts_merge_as_they_come_and_a_duplicate_parts_apart_merges_its_type_again(
    tmp_path, db, smart_source, monkeypatch
):
    """Each line its own part: new ids go in part by part; an id met again three parts later makes its type merge
    again as a whole, so that the newest version is kept and the other quarantined, as in a one-part load."""
    from health_ingest.batch import fhir

    def patient(n: int, updated: str, gender: str = "female") -> dict:
        return {"resourceType": "Patient", "id": f"p{n}", "gender": gender, "meta": {"lastUpdated": updated}}

    patients = [patient(n, "2024-01-01T00:00:00Z") for n in range(6)]
    patients.insert(5, patient(2, "2024-03-01T00:00:00Z", gender="male"))  # line 6: a newer p2
    encounters = [
        {"resourceType": "Encounter", "id": f"e{n}", "status": "finished", "subject": {"reference": f"Patient/p{n}"}}
        for n in range(4)
    ]
    (tmp_path / "Patient.ndjson").write_text("".join(json.dumps(p) + "\n" for p in patients))
    (tmp_path / "Encounter.ndjson").write_text("".join(json.dumps(e) + "\n" for e in encounters))
    monkeypatch.setattr(fhir, "CHUNK_BYTES", 8)
    monkeypatch.setattr(fhir, "SPOOL_BYTES", 1)
    merged_whole = []
    real_merge = merge.merge_resource_type

    def merge_whole(cur, batch_id, resource_type, *args):
        merged_whole.append(resource_type)
        return real_merge(cur, batch_id, resource_type, *args)

    monkeypatch.setattr(merge, "merge_resource_type", merge_whole)
    result = run_fhir_batch(tmp_path, smart_source)

    assert (result.rows_read, result.rows_loaded, result.rows_quarantined) == (11, 10, 1)
    assert merged_whole == ["Patient"], "Encounter, all new, went in part by part"
    assert _table_counts(db) == {"patient": 6, "encounter": 4}
    with db.cursor() as cur:
        cur.execute("SELECT resource->>'gender', count(*) FROM fhir.patient GROUP BY 1 ORDER BY 1")
        assert cur.fetchall() == [("female", 5), ("male", 1)]
        cur.execute("SELECT line_number, reason FROM ingest.quarantine")
        assert cur.fetchall() == [(3, "duplicate_in_batch")]
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'ingest_staging'")
        assert cur.fetchone()[0] == 0


def test_a_row_lost_on_its_way_to_staging_fails_the_batch(db, smart_source, monkeypatch):
    """PostgreSQL's count of each part's COPY is compared with what the reader put in it, before anything commits."""
    from health_ingest.warehouse import staging

    real_copy = staging.copy_files
    dropped = []

    def copy_all_but_one_line(cur, table, files, *args, **kwargs):
        lines = files[-1].read_bytes().splitlines(keepends=True) if files else []
        if not dropped and table.split(".")[1].split("_")[1] == "encounter" and len(lines) > 1:
            files[-1].write_bytes(b"".join(lines[:-1]))
            dropped.append(table)
        return real_copy(cur, table, files, *args, **kwargs)

    monkeypatch.setattr(staging, "copy_files", copy_all_but_one_line)
    with pytest.raises(LoadError, match=r"Encounter\.000\.ndjson: (\d+) records read into a part but \d+ staged"):
        run_fhir_batch(SAMPLE, smart_source)
    assert dropped and all(count == 0 for count in _table_counts(db).values())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_rows_kept_by_the_batch_process_load_like_the_workers_rows(tmp_path, db, smart_source, monkeypatch, workers):
    """A gzip file (its lines go to the workers, its rows come back) and an encoder in the batch's own process
    write their rows here rather than in the workers: staged in many parts, the sample loads exactly the same."""
    import gzip
    import shutil

    from health_ingest.batch import fhir

    for source_file in SAMPLE.glob("*.ndjson"):
        shutil.copy(source_file, tmp_path / source_file.name)
    encounters = tmp_path / "Encounter.000.ndjson"
    (tmp_path / "Encounter.000.ndjson.gz").write_bytes(gzip.compress(encounters.read_bytes()))
    encounters.unlink()
    monkeypatch.setenv("HEALTH_INGEST_WORKERS", workers)
    monkeypatch.setattr(fhir, "SPOOL_BYTES", 1 << 16)
    result = run_fhir_batch(tmp_path, smart_source)
    assert result.rows_quarantined == 0
    assert _table_counts(db) == {t.lower(): n for t, n in sample_line_counts().items()}


def test_two_sources_bringing_the_same_new_tables_at_once_both_commit(tmp_path, db, monkeypatch):
    """Deliveries of different sources load at the same time (Celery workers); the first to create a table new to
    the warehouse makes the other wait for its commit instead of failing it on the catalog's unique key. On a fresh
    state folder both find no demo key at the same instant: one makes it, and both pseudonymise with it."""
    import threading

    from health_ingest.sources.registry import get_source

    monkeypatch.setenv("HEALTH_INGEST_STATE", str(tmp_path / "state"))
    started = threading.Barrier(2, timeout=30)
    barrier = threading.Barrier(2, timeout=5)
    waited: set[int] = set()
    real_create = merge.create_unindexed_table

    def create_together(cur, resource_type):
        if threading.get_ident() not in waited:  # both batches reach their first new table before either goes on
            waited.add(threading.get_ident())
            # a batch that finds the other creating tables waits for it before reaching here: then they go in turn
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return real_create(cur, resource_type)

    monkeypatch.setattr(merge, "create_unindexed_table", create_together)
    results: dict[str, object] = {}

    def load(name: str) -> None:
        try:
            source = get_source(name)
            started.wait()  # both batches look for the demo key at once
            results[name] = run_fhir_batch(SAMPLE, source)
        except Exception as error:  # reported below with the other batch's outcome
            results[name] = error

    threads = [threading.Thread(target=load, args=(name,)) for name in ("smart_sample", "synthea_fhir")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert {name: getattr(r, "status", repr(r)) for name, r in results.items()} == {
        "smart_sample": "committed",
        "synthea_fhir": "committed",
    }
    assert len({result.key_id for result in results.values()}) == 1, "one demo key, made once"
    assert _table_counts(db) == {t.lower(): 2 * n for t, n in sample_line_counts().items()}


def test_a_batch_run_from_a_daemonic_process_commits(db, smart_source):
    """Celery's default prefork pool runs tasks in daemonic processes, which may not start the batch's worker
    processes: the batch then reads in its own process, and commits the same."""
    import multiprocessing

    process = multiprocessing.get_context("fork").Process(target=run_fhir_batch, args=(SAMPLE, smart_source))
    process.daemon = True
    process.start()
    process.join(timeout=300)

    assert process.exitcode == 0
    with db.cursor() as cur:
        cur.execute("SELECT status, rows_read, rows_loaded FROM ingest.batches")
        total = sum(sample_line_counts().values())
        assert cur.fetchall() == [("committed", total, total)]
