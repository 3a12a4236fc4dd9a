"""The ingestion task tells Airflow whether a retry can help: a rejected batch or a delivery that is not there fails
at once; a warehouse out of reach is left to Airflow's retries."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException
from conftest import SAMPLE
from health_ingest.airflow.tasks import ingest_delivery
from health_ingest.errors import LoadError

pytestmark = pytest.mark.integration

PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "robot", "birthDate": "1980-04-02"}


def test_a_rejected_batch_fails_its_task_without_retry(tmp_path, db):
    (tmp_path / "Patient.ndjson").write_text(json.dumps(PATIENT) + "\n")
    with pytest.raises(AirflowFailException, match="rejected: data quality"):
        ingest_delivery("smart_sample", str(tmp_path))
    with db.cursor() as cur:
        cur.execute("SELECT status FROM ingest.batches")
        assert cur.fetchall() == [("rejected",)]


def test_a_delivery_that_is_not_there_fails_its_task_without_retry(tmp_path, db):
    with pytest.raises(AirflowFailException, match="the delivery is no folder"):
        ingest_delivery("smart_sample", str(tmp_path / "absent"))


def test_a_warehouse_out_of_reach_is_left_to_airflow_retries(monkeypatch):
    monkeypatch.setenv("HEALTH_INGEST_WAREHOUSE_URL", "postgresql://postgres@127.0.0.1:1/none")
    with pytest.raises(LoadError, match="the warehouse cannot be reached") as raised:
        ingest_delivery("smart_sample", str(SAMPLE))
    assert raised.value.retryable
