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
    load_delivery(first, source)
    with db.cursor() as cur:  # the last commit was 30 hours ago: longer than the 26h the source promises
        cur.execute("UPDATE ingest.batches SET committed_at = committed_at - interval '30 hours'")
    checker = dag("maintenance_source_cadence")

    assert checker.test().state == "success"
    assert checker.test().state == "success"
    assert [m["subject"] for m in smtp.messages] == [b["title"] for b in webhook.bodies]
    assert len(smtp.messages) == 1 and "source quiet" in smtp.messages[0]["subject"]

    load_delivery(deliver(inbox, "delivery-002", {"Patient.000.ndjson": SAMPLE / "Patient.000.ndjson"}), source)
    assert checker.test().state == "success"
    assert checker.test().state == "success"
    subjects = [m["subject"] for m in smtp.messages]
    assert len(subjects) == 2 and "delivers again" in subjects[1], subjects
    assert len(webhook.bodies) == 2
    assert subjects == sorted(subjects, key=lambda s: s.split("]")[0]) or "P2" in subjects[0]
