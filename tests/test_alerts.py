"""Alerts for operators, sent by the real DAGs to a real SMTP server and a real webhook receiver on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from alert_receivers import SmtpReceiver, WebhookReceiver
from conftest import PROJECT, SAMPLE, sample_identifiers

pytestmark = pytest.mark.integration

SOURCE = "alerting"
DAG_ID = f"fhir_{SOURCE}"


@pytest.fixture
def receivers(monkeypatch):
    """An SMTP server and a webhook receiver, each an Airflow connection the sources file names as a channel."""
    smtp, webhook = SmtpReceiver().start(), WebhookReceiver().start()
    monkeypatch.setenv("AIRFLOW_CONN_OPS_EMAIL", smtp.connection_uri())
    monkeypatch.setenv("AIRFLOW_CONN_OPS_CHAT", webhook.connection_uri())
    yield smtp, webhook
    smtp.stop()
    webhook.stop()


@pytest.fixture
def sources_file(tmp_path, monkeypatch):
    """A sources file with one FHIR source alerting both channels; `write(**options)` changes the source."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = tmp_path / "sources.yml"

    def write(**options):
        entry = {
            "name": SOURCE,
            "kind": "fhir",
            "description": "A source whose failures alert the operators.",
            "inbox": str(inbox),
            "owner": "operations",
            "retries": 2,
            "retry_delay": "1s",
            "expect_every": "26h",
            "linking_identifiers": ["http://hl7.org/fhir/sid/us-ssn"],
            **options,
        }
        document = {"alerts": {"channels": ["ops_email", "ops_chat"]}, "sources": [entry]}
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
        return inbox

    monkeypatch.setenv("HEALTH_INGEST_SOURCES", str(path))
    write()
    return write


def dag(dag_id: str = DAG_ID):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def deliver(inbox: Path, name: str, files: dict[str, str | Path]) -> Path:
    """A delivery as a sender makes it: its files, then the `_READY` marker last."""
    folder = inbox / name
    folder.mkdir()
    for file_name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, folder / file_name)
        else:
            (folder / file_name).write_text(content, encoding="utf-8")
    (folder / "_READY").touch()
    return folder


def alert_texts(smtp: SmtpReceiver, webhook: WebhookReceiver) -> list[str]:
    return [m["subject"] + "\n" + m["text"] for m in smtp.messages] + [
        b["title"] + "\n" + b["message"] for b in webhook.bodies
    ]


def assert_no_identifier(texts: list[str]) -> None:
    everything = "\n".join(texts)
    leaks = {kind: sorted(v for v in values if v in everything) for kind, values in sample_identifiers().items()}
    assert {kind: found for kind, found in leaks.items() if found} == {}, "no original identifier in any alert"


def test_quiet_source_alerts_once_then_once_on_recovery(airflow_db, db, receivers, sources_file):
    from health_ingest.batch.load import load_delivery
    from health_ingest.sources.registry import get_source

    smtp, webhook = receivers
    inbox = sources_file()
    source = get_source(SOURCE)
    first = deliver(inbox, "delivery-001", {"Patient.000.ndjson": SAMPLE / "Patient.000.ndjson"})
    load_delivery(source, first)
    with db.cursor() as cur:  # the last commit was 30 hours ago: longer than the 26h the source promises
        cur.execute("UPDATE ingest.batches SET committed_at = committed_at - interval '30 hours'")
    checker = dag("maintenance_source_cadence")

    assert checker.test().state == "success"
    assert checker.test().state == "success"
    assert [m["subject"] for m in smtp.messages] == [b["title"] for b in webhook.bodies]
    assert len(smtp.messages) == 1 and "source quiet" in smtp.messages[0]["subject"]

    load_delivery(source, deliver(inbox, "delivery-002", {"Patient.000.ndjson": SAMPLE / "Patient.000.ndjson"}))
    assert checker.test().state == "success"
    assert checker.test().state == "success"
    subjects = [m["subject"] for m in smtp.messages]
    assert len(subjects) == 2 and "delivers again" in subjects[1], subjects
    assert len(webhook.bodies) == 2
    assert subjects == sorted(subjects, key=lambda s: s.split("]")[0]) or "P2" in subjects[0]


def patients_with_a_robot() -> str:
    """A quality error the Patient suite rejects: the sample's patients, the first of gender 'robot'."""
    import json

    lines = (SAMPLE / "Patient.000.ndjson").read_text().splitlines()
    first = json.loads(lines[0])
    return "\n".join([json.dumps({**first, "gender": "robot"}), *lines[1:]]) + "\n"


def ingest_tries(run) -> list[int]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id, task_id="ingest").all()
        return sorted(ti.try_number for ti in tis)


def batches(db) -> list[tuple]:
    with db.cursor() as cur:
        cur.execute(
            "SELECT batch_id::text, status, delivery, rows_read, rows_quarantined, error FROM ingest.batches "
            "ORDER BY started_at"
        )
        return cur.fetchall()


def test_clean_delivery_sends_no_alert(airflow_db, db, receivers, sources_file):
    smtp, webhook = receivers
    inbox = sources_file()
    deliver(inbox, "delivery-001", {"Patient.000.ndjson": SAMPLE / "Patient.000.ndjson"})

    run = dag().test()

    assert run.state == "success"
    assert [b[1] for b in batches(db)] == ["committed"]
    assert smtp.messages == [] and webhook.bodies == []
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM ingest.alerts")
        assert cur.fetchone()[0] == 0


def test_rejected_delivery_alerts_once_per_channel_runs_once_and_waits_aside_until_requeued(
    airflow_db, db, receivers, sources_file
):
    from health_ingest.cli import main

    smtp, webhook = receivers
    inbox = sources_file()
    bad = deliver(
        inbox,
        "delivery-001",
        {"Patient.000.ndjson": patients_with_a_robot()},
    )

    run = dag().test()

    assert run.state == "failed"
    assert ingest_tries(run) == [1], "a rejection is never retried"
    [(batch_id, status, delivery, read, quarantined, _)] = batches(db)
    assert (status, delivery, read, quarantined) == ("rejected", "delivery-001", 13, 0)
    assert (bad / "_REJECTED").read_text().strip() == batch_id and not (bad / "_QUEUED").exists()
    assert len(smtp.messages) == 1 and len(webhook.bodies) == 1, "one alert on each channel"
    for text in alert_texts(smtp, webhook):
        assert batch_id in text and "rejected" in text and "fhir.patient expect_column_values_to_be_in_set" in text
        assert "P1 ERROR" in text and "deliveries requeue" in text
    assert_no_identifier(alert_texts(smtp, webhook))

    deliver(inbox, "delivery-002", {"Patient.000.ndjson": SAMPLE / "Patient.000.ndjson"})
    run = dag().test()
    assert run.state == "success", "the set-aside delivery no longer holds the source back"
    assert [(b[1], b[2]) for b in batches(db)] == [("rejected", "delivery-001"), ("committed", "delivery-002")]
    assert len(smtp.messages) == 1 and len(webhook.bodies) == 1

    shutil.copy(SAMPLE / "Patient.000.ndjson", bad / "Patient.000.ndjson")  # the sender's fix
    assert main(["deliveries", "requeue", "--source", SOURCE, batch_id[:8]]) == 0
    run = dag().test()
    assert run.state == "success"
    assert [(b[1], b[2]) for b in batches(db)][-1] == ("committed", "delivery-001")
    assert (bad / "_DONE").exists() and not (bad / "_REJECTED").exists()


def test_failure_exhausting_retries_alerts_once_after_the_last_try(airflow_db, db, receivers, sources_file, capsys):
    from health_ingest.cli import main

    smtp, webhook = receivers
    inbox = sources_file()
    delivery = deliver(inbox, "delivery-001", {"Patient.000.ndjson": SAMPLE / "Patient.000.ndjson"})
    with db.cursor() as cur:  # the warehouse refuses every commit: a failure no try of the task gets past
        cur.execute(
            """
            CREATE FUNCTION refuse_commits() RETURNS trigger LANGUAGE plpgsql AS
              $$ BEGIN RAISE EXCEPTION 'commits are refused for maintenance'; END $$;
            CREATE TRIGGER refuse_commits BEFORE UPDATE ON ingest.batches
              FOR EACH ROW WHEN (NEW.status = 'committed') EXECUTE FUNCTION refuse_commits();
            """
        )

    run = dag().test()

    assert run.state == "failed"
    assert ingest_tries(run) == [3], "two retries, then the last try"
    failed = batches(db)
    assert [b[1] for b in failed] == ["failed"] * 3 and all(b[3] == 13 for b in failed), "true counts kept"
    assert len(smtp.messages) == 1 and len(webhook.bodies) == 1, "one alert, after the last try"
    last_batch = failed[-1][0]
    for text in alert_texts(smtp, webhook):
        assert last_batch in text and "failed" in text and "P0001" in text and "try 3 of 3" in text
    assert (delivery / "_FAILED").read_text().strip() == last_batch
    assert_no_identifier(alert_texts(smtp, webhook))

    capsys.readouterr()
    assert main(["deliveries", "list", "--source", SOURCE]) == 0
    listed = capsys.readouterr().out
    assert last_batch in listed and "failed" in listed and "commits are refused" in listed
    assert main(["deliveries", "discard", "--source", SOURCE, "--all"]) == 0
    assert not delivery.exists(), "discarded: its raw files are gone from the inbox"


def test_quarantine_share_above_threshold_warns_once_and_the_batch_commits(airflow_db, db, receivers, sources_file):
    smtp, webhook = receivers
    inbox = sources_file()
    encounters = (SAMPLE / "Encounter.000.ndjson").read_text().splitlines(keepends=True)
    garbage = "".join(f'{{"resourceType": "Encounter", "status": "finished", "n": {n}}}\n' for n in range(40))
    deliver(
        inbox,
        "delivery-001",
        {"Patient.000.ndjson": SAMPLE / "Patient.000.ndjson", "Encounter.000.ndjson": "".join(encounters) + garbage},
    )

    run = dag().test()

    assert run.state == "success"
    [(batch_id, status, _, read, quarantined, _)] = batches(db)
    assert (status, read, quarantined) == ("committed", 13 + len(encounters) + 40, 40)
    assert len(smtp.messages) == 1 and len(webhook.bodies) == 1
    for text in alert_texts(smtp, webhook):
        assert batch_id in text and "committed" in text and "P2 WARNING" in text and "threshold" in text
    assert_no_identifier(alert_texts(smtp, webhook))


def test_all_garbage_patient_file_is_rejected_by_the_ceiling_naming_the_file(
    airflow_db, db, receivers, sources_file, capsys
):
    from health_ingest.cli import main

    smtp, webhook = receivers
    inbox = sources_file()
    encounters = SAMPLE / "Encounter.000.ndjson"
    garbage = "".join(f"not a patient {n}\n" for n in range(13))
    deliver(inbox, "2026-03-01", {"Patient.000.ndjson": garbage, "Encounter.000.ndjson": encounters})

    run = dag().test()

    assert run.state == "failed" and ingest_tries(run) == [1]
    [(batch_id, status, delivery, read, quarantined, error)] = batches(db)
    lines = len(encounters.read_text().splitlines())
    assert (status, delivery, read, quarantined) == ("rejected", "2026-03-01", 13 + lines, 13)
    assert error.startswith("quarantine ceiling: Patient.000.ndjson: 13 of 13 records quarantined")
    with db.cursor() as cur:
        cur.execute("SELECT to_regclass('fhir.encounter')")
        assert cur.fetchone()[0] is None, "none of its resources loaded"
    assert len(smtp.messages) == 1 and all("Patient.000.ndjson" in t for t in alert_texts(smtp, webhook))

    capsys.readouterr()
    assert main(["warehouse", "status", "--source", SOURCE]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert batch_id in shown and "2026-03-01" in shown and " ".join(error.split()) in shown, "the whole reason"


def test_smtp_down_leaves_the_outcome_and_logs_the_alert_undelivered(airflow_db, db, receivers, sources_file):
    import logging

    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("health_ingest.airflow.notifiers").addHandler(handler)
    smtp, webhook = receivers
    smtp.stop()
    inbox = sources_file()
    bad = deliver(
        inbox,
        "delivery-001",
        {"Patient.000.ndjson": patients_with_a_robot()},
    )

    run = dag().test()

    assert run.state == "failed" and ingest_tries(run) == [1], "rejected once, as without alerts"
    assert (bad / "_REJECTED").exists()
    assert len(webhook.bodies) == 1, "the other channel still delivered"
    with db.cursor() as cur:
        cur.execute("SELECT kind, delivered, undelivered FROM ingest.alerts")
        assert cur.fetchall() == [("rejected", ["ops_chat"], ["ops_email"])]
    logging.getLogger("health_ingest.airflow.notifiers").removeHandler(handler)
    assert any("NOT delivered to ops_email (ConnectionRefusedError" in line for line in logged), logged

    # still down: the next delivery commits as it would without alerts
    deliver(inbox, "delivery-002", {"Patient.000.ndjson": SAMPLE / "Patient.000.ndjson"})
    assert dag().test().state == "success"


def test_deadline_alert_fires_once_for_a_run_held_past_its_interval(
    airflow_db, db, receivers, sources_file, monkeypatch
):
    """A run triggered as the UI does, then held in the queue (no scheduler takes it): the scheduler's pass over
    deadlines queues the DAG's Deadline Alert callback, and the triggerer's callback trigger runs it."""
    import asyncio
    import time
    from datetime import UTC, datetime

    from airflow._shared.module_loading import import_string
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.deadline import Deadline
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import select

    smtp, webhook = receivers
    sources_file(alerts={"late_after": "3s"})
    monkeypatch.setenv("AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL", "0")  # the DAG changed just now
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(DagBag(dag_folder=str(PROJECT / "dags")), "dags-folder", None)
    run = trigger_dag(DAG_ID, triggered_by=DagRunTriggeredByType.UI, conf={})
    assert run.state == "queued"

    def scheduler_pass() -> list:
        """What the scheduler does with the deadlines each loop: those passed and not yet handled are missed."""
        with create_session() as session:
            missed = session.scalars(
                select(Deadline).where(Deadline.deadline_time < datetime.now(UTC)).where(~Deadline.missed)
            ).all()
            for deadline in missed:
                deadline.handle_miss(session)
            session.flush()
            return [(d.dagrun.run_id, d.callback.trigger.classpath, d.callback.trigger.kwargs) for d in missed]

    def triggerer_runs(classpath: str, kwargs: dict) -> list[dict]:
        trigger = import_string(classpath)(**kwargs)

        async def events():
            return [event.payload async for event in trigger.run()]

        return asyncio.run(events())

    assert scheduler_pass() == [], "not late yet"
    time.sleep(3.5)
    missed = scheduler_pass()
    assert [run_id for run_id, _, _ in missed] == [run.run_id]
    for _, classpath, kwargs in missed:
        assert triggerer_runs(classpath, kwargs)[-1]["state"] == "success"
    assert scheduler_pass() == [], "a missed deadline is handled once"

    assert len(smtp.messages) == 1 and len(webhook.bodies) == 1
    for text in alert_texts(smtp, webhook):
        assert "run late" in text and run.run_id in text and "P2 WARNING" in text and "3 s after" in text


def test_alerts_test_command_says_which_channels_delivered_by_its_exit_code(receivers, sources_file, capsys):
    from health_ingest.cli import main

    smtp, webhook = receivers
    assert main(["alerts", "test", "--source", SOURCE]) == 0
    assert len(smtp.messages) == 1 and len(webhook.bodies) == 1 and "test alert" in smtp.messages[0]["subject"]
    said = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("delivered", "UNDEL"))]
    assert said == [["delivered", "ops_email"], ["delivered", "ops_chat"]]

    smtp.stop()
    assert main(["alerts", "test", "--source", SOURCE]) == 7, "some channels did not deliver"
    out = capsys.readouterr().out
    assert "delivered    ops_chat" in out and "UNDELIVERED  ops_email: ConnectionRefusedError" in out

    sources_file(alerts={"channels": ["ops_email"]})  # the source's own list replaces the default
    assert main(["alerts", "test", "--source", SOURCE]) == 8, "no channel delivered"
    sources_file(alerts={"channels": []})
    assert main(["alerts", "test", "--source", SOURCE]) == 2, "no channel to test"
    assert len(webhook.bodies) == 2
