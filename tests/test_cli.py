"""The console script, as a user runs it: one batch without Airflow, then the warehouse status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import SAMPLE

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "health_ingest", *args], capture_output=True, text=True, env=os.environ.copy()
    )


def test_ingest_then_status(warehouse_url):
    ingest = _cli("ingest", "fhir", str(SAMPLE), "--source", "smart_sample")
    assert ingest.returncode == 0, ingest.stderr
    assert "total               7,160   7,160            0  ok" in ingest.stdout
    assert "skipped log.ndjson" in ingest.stdout
    assert "Procedure.000.ndjson: 2,056 records (done)" in ingest.stderr, "progress is shown"

    status = _cli("warehouse", "status")
    assert status.returncode == 0, status.stderr
    assert "committed" in status.stdout and "7,160" in status.stdout


def test_unknown_source_and_missing_delivery_are_clear_errors(warehouse_url, tmp_path):
    unknown = _cli("ingest", "fhir", str(SAMPLE), "--source", "nope")
    assert unknown.returncode == 2
    assert "unknown source 'nope' (declared: cms_rif, smart_sample, snds_extract" in unknown.stderr

    missing = _cli("ingest", "fhir", str(tmp_path / "absent"), "--source", "smart_sample")
    assert missing.returncode == 4
    assert "the delivery is no folder, NDJSON file or Bundle" in missing.stderr and "absent" not in missing.stderr


def test_with_only_the_airflow_connection_every_command_uses_that_warehouse(pg_admin_url, tmp_path):
    """`AIRFLOW_CONN_HEALTH_INGEST_WAREHOUSE` alone (as docker-compose.yml sets it) names the warehouse of every
    command: migrations, loads, status, flat tables, Data Docs, retention, re-keying. None starts the embedded one."""
    import uuid

    import psycopg2
    from conftest import _with_database

    name = f"hi_test_conn_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = _with_database(pg_admin_url, name)
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "HEALTH_INGEST_WAREHOUSE_URL"}
    keyring = tmp_path / "keyring.json"
    env |= {"AIRFLOW_CONN_HEALTH_INGEST_WAREHOUSE": url, "HEALTH_INGEST_STATE": str(state)}
    env |= {"HEALTH_INGEST_KEYRING": str(keyring), "HEALTH_INGEST_DEMO": ""}
    delivery = tmp_path / "export-0001"
    delivery.mkdir()
    for file_name in ("Patient.000.ndjson", "Encounter.000.ndjson"):
        (delivery / file_name).write_bytes((SAMPLE / file_name).read_bytes())

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "health_ingest", *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert "embedded" not in done.stderr, args
        return done.stdout

    def one(query: str):
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchone()
        finally:
            conn.close()

    try:
        cli("keys", "new", "--keyring", str(keyring))
        assert cli("warehouse", "url").strip() == url
        cli("warehouse", "migrate")
        assert one("SELECT to_regclass('ingest.batches') IS NOT NULL") == (True,)
        cli("ingest", "fhir", str(delivery), "--source", "smart_sample")
        (batch_id,) = one("SELECT batch_id::text FROM ingest.batches WHERE status = 'committed'")
        assert batch_id in cli("warehouse", "status")
        cli("views", "refresh", "--batch", batch_id)
        assert one("SELECT count(*) FROM flat.encounter") == (1215,)
        cli("views", "rebuild")
        assert one("SELECT count(*) FROM flat.encounter") == (1215,)
        assert batch_id in cli("quality", "docs", "--batch", batch_id)
        assert one("SELECT count(*) FROM ingest.purges") == (0,)
        cli("retention", "purge")
        assert one("SELECT count(*) FROM ingest.purges")[0] > 0, "the purge is recorded in that warehouse"
        cli("keys", "rotate", "--keyring", str(keyring))
        cli("warehouse", "rekey")
        assert one("SELECT count(*) FROM ingest.batches WHERE rekeyed_at IS NOT NULL") == (1,)
        assert not (state / "warehouse-pg").exists(), "no embedded warehouse was started"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_without_any_warehouse_configured_the_embedded_one_is_announced(tmp_path):
    from health_ingest.warehouse.embedded import stop_embedded_warehouse

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in {"HEALTH_INGEST_WAREHOUSE_URL"}}
    env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW_CONN_HEALTH_INGEST_WAREHOUSE")}
    env["HEALTH_INGEST_STATE"] = str(state)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "health_ingest", "warehouse", "url"], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        assert "no warehouse configured" in done.stderr and "using the embedded PostgreSQL" in done.stderr
        assert (state / "warehouse-pg").exists()
    finally:
        stop_embedded_warehouse(state / "warehouse-pg")


def test_commands_starting_together_without_a_warehouse_share_one_embedded_server(tmp_path):
    """Several batches (commands, Celery workers) start at once on a fresh state folder with no warehouse
    configured: one creates and starts the embedded server and its database, the others wait and find them."""
    from health_ingest.warehouse.embedded import stop_embedded_warehouse

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in {"HEALTH_INGEST_WAREHOUSE_URL"}}
    env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW_CONN_HEALTH_INGEST_WAREHOUSE")}
    env["HEALTH_INGEST_STATE"] = str(state)
    command = [sys.executable, "-m", "health_ingest", "warehouse", "url"]
    try:
        runs = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(3)
        ]
        outputs = [run.communicate(timeout=120) for run in runs]
        assert [run.returncode for run in runs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
        assert len({out for out, _ in outputs}) == 1, "one server and one database for all"
    finally:
        stop_embedded_warehouse(state / "warehouse-pg")
