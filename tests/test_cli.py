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
    assert "no such delivery folder" in missing.stderr
