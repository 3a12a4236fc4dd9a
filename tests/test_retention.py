"""Raw data past its retention is purged, and the purge is recorded; recent data stays."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import timedelta

import pytest
from conftest import SAMPLE
from health_ingest import config
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.warehouse.retention import purge_raw_data

pytestmark = pytest.mark.integration


def test_old_landing_copies_and_quarantine_records_are_purged_and_logged(tmp_path, db, smart_source):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "Patient.ndjson").write_text("not json\n")
    # its only record quarantined: a batch that commits only under a lifted quarantine ceiling
    lenient = replace(smart_source, quality=replace(smart_source.quality, quarantine_ceiling=1.0))
    old = run_fhir_batch(bad, lenient)
    recent = run_fhir_batch(SAMPLE / "Patient.000.ndjson", smart_source)
    landing = config.state_dir() / "landing" / smart_source.name
    forty_days_ago = time.time() - 40 * 86400
    os.utime(landing / old.batch_id, (forty_days_ago, forty_days_ago))
    with db.cursor() as cur:
        cur.execute("UPDATE ingest.quarantine SET quarantined_at = now() - interval '40 days'")

    report = purge_raw_data(db, older_than=timedelta(days=30))

    assert (report.landing_folders, report.quarantine_records) == (1, 1)
    assert not (landing / old.batch_id).exists() and (landing / recent.batch_id).exists()
    with db.cursor() as cur:
        cur.execute("SELECT what, items FROM ingest.purges ORDER BY what")
        assert cur.fetchall() == [("landing", 1), ("quarantine", 1)]
        cur.execute("SELECT count(*) FROM ingest.quarantine")
        assert cur.fetchone()[0] == 0
