"""The jurisdiction guard refuses before anything is sent; roles keep readers to pseudonymised data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psycopg2
import pytest
from conftest import SAMPLE
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.warehouse.jurisdiction import JurisdictionRefused, check_warehouse

AZURE_US = {"provider": "azure", "region": "francecentral", "jurisdiction": "US"}
OVH_FR = {"provider": "ovhcloud", "region": "eu-west-par", "jurisdiction": "FR"}


@pytest.mark.integration
def test_a_us_jurisdiction_provider_is_refused_and_nothing_is_sent(db, smart_source, monkeypatch):
    monkeypatch.setenv("HEALTH_INGEST_WAREHOUSE_HOSTING", json.dumps(AZURE_US))
    with pytest.raises(JurisdictionRefused, match=r"rule 'allowed_jurisdictions' .*jurisdiction US of azure"):
        run_fhir_batch(SAMPLE, smart_source)
    monkeypatch.setenv("HEALTH_INGEST_WAREHOUSE_HOSTING", json.dumps({**AZURE_US, "jurisdiction": "EU"}))
    with pytest.raises(JurisdictionRefused, match=r"rule 'extraterritorial_providers' .*refused even in region"):
        run_fhir_batch(SAMPLE, smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM ingest.batches")
        assert cur.fetchone()[0] == 0
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'health-ingest'"
            " AND datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert cur.fetchone()[0] == 0, "no connection was even opened"


@pytest.mark.integration
def test_an_eu_provider_is_accepted_and_the_decision_recorded(db, smart_source, monkeypatch):
    monkeypatch.setenv("HEALTH_INGEST_WAREHOUSE_HOSTING", json.dumps(OVH_FR))
    run_fhir_batch(SAMPLE / "Patient.000.ndjson", smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT status, hosting FROM ingest.batches")
        assert cur.fetchall() == [("committed", "ovhcloud / eu-west-par / jurisdiction FR")]


@pytest.mark.integration
def test_an_exception_with_a_justification_allows_a_provider_and_is_recorded(tmp_path, db, smart_source, monkeypatch):
    from conftest import PROJECT

    policy = (
        (PROJECT / "dags" / "hosting-policy.yml")
        .read_text()
        .replace(
            "exceptions: []",
            "exceptions:\n  - provider: aws\n    region: eu-west-3\n"
            '    justification: "DPIA 2026-014, keys on premises"',
        )
    )
    (tmp_path / "policy.yml").write_text(policy)
    monkeypatch.setenv("HEALTH_INGEST_HOSTING_POLICY", str(tmp_path / "policy.yml"))
    monkeypatch.setenv(
        "HEALTH_INGEST_WAREHOUSE_HOSTING", json.dumps({"provider": "aws", "region": "eu-west-3", "jurisdiction": "FR"})
    )
    run_fhir_batch(SAMPLE / "Patient.000.ndjson", smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT hosting FROM ingest.batches")
        assert "allowed by exception: DPIA 2026-014, keys on premises" in cur.fetchone()[0]


def test_a_remote_host_needs_verified_tls_and_a_declaration():
    remote = "postgresql://loader@warehouse.example.eu:5432/warehouse"
    with pytest.raises(JurisdictionRefused, match="rule 'declaration-required'"):
        check_warehouse(remote, None)
    with pytest.raises(JurisdictionRefused, match="rule 'require_verified_tls_for_remote_hosts'"):
        check_warehouse(remote + "?sslmode=require", OVH_FR)
    decision = check_warehouse(remote + "?sslmode=verify-full", OVH_FR)
    assert decision.hosting.jurisdiction == "FR"
    assert check_warehouse("postgresql://postgres@127.0.0.1:5432/w", None).declared is False


def test_the_cli_refuses_with_the_rule_name():
    env = {
        **os.environ,
        "HEALTH_INGEST_WAREHOUSE_URL": "postgresql://postgres@127.0.0.1:1/none",
        "HEALTH_INGEST_WAREHOUSE_HOSTING": json.dumps(AZURE_US),
    }
    result = subprocess.run(
        [sys.executable, "-m", "health_ingest", "warehouse", "status"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert "rule 'allowed_jurisdictions'" in result.stderr


@pytest.mark.integration
def test_the_reader_role_sees_pseudonymised_tables_but_not_escrow_or_quarantine(warehouse_url, db, smart_source):
    run_fhir_batch(SAMPLE / "Patient.000.ndjson", smart_source)
    reader = f"hi_reader_{uuid.uuid4().hex[:8]}"
    with db.cursor() as cur:
        cur.execute(f"CREATE ROLE {reader} LOGIN IN ROLE health_ingest_reader")
    try:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(warehouse_url)
        conn = psycopg2.connect(urlunsplit(parts._replace(netloc=f"{reader}@{parts.netloc.split('@', 1)[-1]}")))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM fhir.patient")
            assert cur.fetchone()[0] == 13
            cur.execute("SELECT batch_id, commit_seq FROM ingest.batches WHERE status = 'committed'")
            assert len(cur.fetchall()) == 1
            for denied in ("escrow.identifiers", "ingest.quarantine", "ingest.person_links", "ingest.batch_files"):
                with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                    cur.execute(f"SELECT * FROM {denied} LIMIT 1")
        conn.close()
    finally:
        with db.cursor() as cur:
            cur.execute(f"DROP ROLE {reader}")
