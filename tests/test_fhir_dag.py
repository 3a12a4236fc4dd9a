"""The FHIR DAG, run for real with `dag.test()` against a real PostgreSQL."""

from __future__ import annotations

import shutil

import pytest
from conftest import SAMPLE, sample_line_counts

pytestmark = pytest.mark.integration


def _fhir_dag():
    from airflow.dag_processing.dagbag import DagBag
    from conftest import PROJECT

    return DagBag(dag_folder=str(PROJECT / "dags")).dags["fhir_smart_sample"]


def test_dag_run_loads_the_sample_into_the_warehouse(airflow_db, db):
    run = _fhir_dag().test(run_conf={"delivery_path": str(SAMPLE)})

    assert run.state == "success"
    with db.cursor() as cur:
        cur.execute("SELECT status, rows_read, rows_loaded, rows_quarantined FROM ingest.batches")
        assert cur.fetchall() == [("committed", 7160, 7160, 0)]
        for resource_type, expected in sample_line_counts().items():
            cur.execute(f"SELECT count(*) FROM fhir.{resource_type.lower()}")
            assert cur.fetchone()[0] == expected, resource_type


def test_delivery_landing_in_the_inbox_is_loaded_and_marked_done(airflow_db, db, smart_source):
    delivery = smart_source.inbox / "delivery-001"
    delivery.mkdir(parents=True)
    shutil.copy(SAMPLE / "Patient.000.ndjson", delivery)
    shutil.copy(SAMPLE / "Encounter.000.ndjson", delivery)
    (delivery / "_READY").touch()
    half_written = smart_source.inbox / "delivery-002"  # no marker yet: the sender is still writing
    half_written.mkdir()
    shutil.copy(SAMPLE / "Condition.000.ndjson", half_written)
    try:
        run = _fhir_dag().test()
    finally:
        shutil.rmtree(half_written)

    assert run.state == "success"
    assert (delivery / "_DONE").exists() and not (delivery / "_READY").exists()
    with db.cursor() as cur:
        cur.execute("SELECT count(*), sum(rows_loaded) FROM ingest.batches WHERE status = 'committed'")
        assert cur.fetchone() == (1, 13 + 1215)
        cur.execute("SELECT to_regclass('fhir.condition')")
        assert cur.fetchone()[0] is None
