"""The FHIR DAG, run for real with `dag.test()` against a real PostgreSQL."""

from __future__ import annotations

import shutil

import pytest
from conftest import SAMPLE, announced_undeclared, into_inbox, sample_identifiers, sample_line_counts

pytestmark = pytest.mark.integration


def _fhir_dag():
    from airflow.dag_processing.dagbag import DagBag
    from conftest import PROJECT

    return DagBag(dag_folder=str(PROJECT / "dags")).dags["fhir_smart_sample"]


def test_dag_run_loads_the_sample_into_the_warehouse(airflow_db, db):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dag = _fhir_dag()
    run = dag.test(run_conf={"delivery_path": str(into_inbox("smart_sample", list(SAMPLE.iterdir())))})

    assert run.state == "success"
    assert announced_undeclared(dag, run) == set(), "every table's Asset is known to Airflow before its event"
    with create_session() as session:
        xcoms = session.query(XComModel).filter_by(dag_id="fhir_smart_sample", run_id=run.run_id).all()
        values = " ".join(str(XComModel.deserialize_value(x)) for x in xcoms)
    assert "7160" in values.replace(",", "") or "'rows_read': 7160" in values
    leaks = {k: [v for v in vs if v in values] for k, vs in sample_identifiers().items()}
    assert {k: v for k, v in leaks.items() if v} == {}, "no original identifier in any XCom of the run"
    with db.cursor() as cur:
        cur.execute("SELECT status, rows_read, rows_loaded, rows_quarantined FROM ingest.batches")
        assert cur.fetchall() == [("committed", 7160, 7160, 0)]
        cur.execute(
            "SELECT airflow_dag_id, airflow_run_id, airflow_task_id, airflow_try_number, airflow_map_index "
            "FROM ingest.batches"
        )
        assert cur.fetchone() == ("fhir_smart_sample", run.run_id, "ingest", 1, 0), "the UI links to the task's log"
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


def test_consumer_dag_reads_exactly_the_rows_of_each_new_batch(airflow_db, db, tmp_path):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.variable import Variable
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from conftest import PROJECT
    from health_ingest.warehouse.consumers import table_asset_uri

    Variable.delete("health_ingest_example_consumer_watermark")  # commit_seq restarts with each test database
    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    producer, consumer = bag.dags["fhir_smart_sample"], bag.dags["example_consumer"]
    encounter_uri = table_asset_uri("fhir", "encounter")
    flat_uri = table_asset_uri("flat", "encounter")
    assert consumer.timetable.asset_condition.uri == flat_uri, "scheduled on the flat table's Asset"

    def consumer_result() -> dict:
        run = consumer.test()
        assert run.state == "success"
        with create_session() as session:
            xcom = (
                session.query(XComModel)
                .filter_by(
                    dag_id="example_consumer", run_id=run.run_id, task_id="read_new_encounters", key="return_value"
                )
                .one()
            )
            return XComModel.deserialize_value(xcom)

    first = into_inbox("smart_sample", [SAMPLE / "Patient.000.ndjson", SAMPLE / "Encounter.000.ndjson"])
    first_run = producer.test(run_conf={"delivery_path": str(first)})
    assert first_run.state == "success"
    with create_session() as session:
        events = {
            uri: [(e.extra["rows"], e.timestamp) for e in events]
            for uri in (encounter_uri, flat_uri)
            for events in [
                session.query(AssetEvent)
                .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .filter(AssetModel.uri == uri)
                .all()
            ]
        }
    assert [rows for rows, _ in events[encounter_uri]] == [1215], "the commit published the table's Asset event"
    assert [rows for rows, _ in events[flat_uri]] == [1215], "the flat refresh published the flat table's event"
    assert events[flat_uri][0][1] > events[encounter_uri][0][1]
    assert list(consumer_result().values()) == [{"fhir.encounter": 1215, "flat.encounter": 1215}]
    assert announced_undeclared(producer, first_run) == set(), "every Asset is known to Airflow before its event"

    lines = (SAMPLE / "Encounter.000.ndjson").read_text().splitlines(keepends=True)
    second = into_inbox("smart_sample", [])
    (second / "Encounter.000.ndjson").write_text("".join(lines[:100]))
    assert producer.test(run_conf={"delivery_path": str(second)}).state == "success"
    second_read = consumer_result()
    with db.cursor() as cur:
        cur.execute("SELECT batch_id::text FROM ingest.batches ORDER BY commit_seq DESC LIMIT 1")
        (latest,) = cur.fetchone()
    assert second_read == {latest: {"fhir.encounter": 100, "flat.encounter": 100}}, "only the new batch, whole"


# folders senders named after patients
PERSON_NAMED = "Durand_Marie_1968"


def test_a_delivery_folder_named_after_a_person_is_in_no_xcom_nor_task_argument_of_its_run(
    airflow_db, db, smart_source
):
    """What Airflow keeps of a run (XComs, the mapped tasks' rendered arguments, their names in the UI) holds each
    delivery's label and a keyed reference, which the ingestion task resolves in the inbox; never the folder's
    name, here found in the inbox by its marker."""
    named = smart_source.inbox / PERSON_NAMED
    usual = smart_source.inbox / "export-0042"
    for folder in (named, usual):
        folder.mkdir(parents=True)
        shutil.copy(SAMPLE / "Patient.000.ndjson", folder)
        shutil.copy(SAMPLE / "Encounter.000.ndjson", folder)
        (folder / "_READY").touch()
    try:
        run = _fhir_dag().test()
        assert run.state == "success"
        assert (named / "_DONE").exists() and (usual / "_DONE").exists(), "both resolved and loaded"
    finally:
        for folder in (named, usual):
            shutil.rmtree(folder)

    kept = _kept_by_airflow(run.run_id)
    assert PERSON_NAMED not in repr(kept) and "Durand" not in repr(kept)
    found = kept["xcom"][("find_deliveries", -1)]
    labels = {d["label"] for d in found}
    assert "export-0042" in labels and len(labels) == 2
    (person_label,) = labels - {"export-0042"}
    assert person_label.startswith("delivery-2")
    assert {d["where"] for d in found} == {"inbox"}
    assert sorted(kept["map_index"].values()) == sorted(labels), "each mapped task is named by its label"
    rendered = repr(kept["rendered"])
    assert all(d["ref"] in rendered for d in found), "the mapped tasks' arguments are kept, and read here"
    with db.cursor() as cur:
        cur.execute("SELECT delivery FROM ingest.batches WHERE status = 'committed'")
        stored = {row[0] for row in cur.fetchall()}
    assert stored == {"export-0042", next(d["ref"] for d in found if d["label"] == person_label)}, (
        "the reference is the keyed label the batch stores"
    )


def test_a_delivery_path_given_in_the_conf_is_read_again_from_it_not_from_an_xcom(airflow_db, db, smart_source):
    """The run's `delivery_path` is the operator's own input, kept as the run's conf; the XComs do not repeat it."""
    files = [SAMPLE / "Patient.000.ndjson", SAMPLE / "Encounter.000.ndjson"]
    folder = into_inbox("smart_sample", files, "Martin_Paul_1975")

    run = _fhir_dag().test(run_conf={"delivery_path": str(folder)})

    assert run.state == "success"
    kept = _kept_by_airflow(run.run_id)
    assert "Martin" not in repr(kept)
    (found,) = kept["xcom"][("find_deliveries", -1)]
    assert found["where"] == "delivery_path" and found["label"].startswith("delivery-2") and "ref" not in found
    assert list(kept["map_index"].values()) == [found["label"]]
    with db.cursor() as cur:
        cur.execute("SELECT status, rows_loaded FROM ingest.batches")
        assert cur.fetchall() == [("committed", 13 + 1215)]


def _kept_by_airflow(run_id: str) -> dict:
    """What Airflow's metadata database keeps of a run of `fhir_smart_sample`: XCom values (as stored, and as read
    back), the rendered arguments and the names of its task instances."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        xcoms = session.query(XComModel).filter_by(dag_id="fhir_smart_sample", run_id=run_id, key="return_value")
        stored = {(x.task_id, x.map_index): (x.value, XComModel.deserialize_value(x)) for x in xcoms}
        rendered = session.query(RenderedTaskInstanceFields).filter_by(dag_id="fhir_smart_sample", run_id=run_id)
        fields = {(r.task_id, r.map_index): r.rendered_fields for r in rendered}
        instances = session.query(TaskInstance).filter_by(dag_id="fhir_smart_sample", run_id=run_id, task_id="ingest")
        names = {ti.map_index: ti.rendered_map_index for ti in instances}
    return {
        "xcom": {key: value for key, (_, value) in stored.items()},
        "xcom_stored": {key: raw for key, (raw, _) in stored.items()},
        "rendered": fields,
        "map_index": names,
    }
