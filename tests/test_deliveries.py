"""Deliveries as they really arrive: the SNDS as its published tree (PMSI included, one table per year), a Synthea
run's whole CSV export, NDJSON files named anyhow."""

from __future__ import annotations

import csv
import gzip
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import SAMPLE as SAMPLE_FOLDER
from conftest import TEST_DATA, pg_dump
from health_ingest.batch.claims import run_claims_batch
from health_ingest.formats.claims import load_profile
from health_ingest.sources.registry import get_source

pytestmark = pytest.mark.integration

SNDS = TEST_DATA / "synthetic-snds"
MCO = SNDS / "PMSI" / "PMSI MCO"
SYNTHEA_CSV = TEST_DATA / "synthea-ma11" / "csv"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def _loaded_rows(cur, path: Path) -> list[dict[str, str]]:
    """The file's rows but those the batch quarantined (by line: these files hold no line break in a value)."""
    cur.execute("SELECT line_number FROM ingest.quarantine WHERE file_name = %s", (path.name,))
    quarantined = {line for (line,) in cur.fetchall()}
    return [row for line, row in enumerate(_rows(path), start=2) if line not in quarantined]


def test_the_published_snds_tree_loads_as_one_batch_and_pmsi_stays_join_their_person(tmp_path, db, warehouse_url):
    delivery = tmp_path / "synthetic-snds"
    shutil.copytree(SNDS, delivery)  # DCIR/, DCIRS/, PMSI/PMSI MCO/, Causes de décès/...
    files = sorted(delivery.rglob("*.csv"))
    assert any(p.parent.name == "PMSI HAD" for p in files) and len(files) >= 190

    result = run_claims_batch(delivery, get_source("snds_extract"))

    profile = load_profile("snds")
    expected = {profile.table_for(p): len(_rows(p)) for p in files}
    assert set(result.counts) == set(expected)
    for table, counts in result.counts.items():
        assert counts.rows_read == counts.rows_loaded + counts.rows_quarantined == expected[table], table
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT batch_id) FROM ingest.batch_files")
        assert cur.fetchone() == (len(files), 1)

        # the stays of the link table join their discharge summaries on ETA_NUM + RSA_NUM
        summaries = {(r["ETA_NUM"], r["RSA_NUM"]) for r in _loaded_rows(cur, MCO / "T_MCOaaB.csv")}
        links = _loaded_rows(cur, MCO / "T_MCOaaC.csv")
        cur.execute("SELECT count(*) FROM claims.snds_t_mcoaac c JOIN claims.snds_t_mcoaab b USING (eta_num, rsa_num)")
        assert cur.fetchone()[0] == sum((r["ETA_NUM"], r["RSA_NUM"]) in summaries for r in links) > 0

        # NIR_ANO_17 is DCIR's BEN_NIR_PSA (the schema's foreign key to IR_BEN_R): one person, one pseudonym
        dcir_people = {r["BEN_NIR_PSA"] for r in _loaded_rows(cur, SNDS / "DCIR" / "ER_PRS_F.csv")}
        pmsi_people = {r["NIR_ANO_17"] for r in links}
        cur.execute(
            "SELECT count(DISTINCT c.patient_id) FROM claims.snds_t_mcoaac c "
            "JOIN claims.snds_er_prs_f p ON p.patient_id = c.patient_id"
        )
        assert cur.fetchone()[0] == len(pmsi_people & dcir_people) > 0
        cur.execute("SELECT count(*), count(DISTINCT patient_id) FROM claims.snds_t_mcoaac")
        assert cur.fetchone() == (len(links), len(pmsi_people))
    dump = pg_dump(warehouse_url)
    for nir in pmsi_people | dcir_people:
        assert nir not in dump


def test_each_year_of_a_pmsi_table_is_a_table_of_its_own_with_its_suite(tmp_path, db):
    delivery = tmp_path / "pmsi"
    delivery.mkdir()
    for year in ("19", "23"):
        for path in MCO.glob("T_MCOaa*.csv"):
            shutil.copy(path, delivery / path.name.replace("aa", year, 1))

    result = run_claims_batch(delivery, get_source("snds_extract"))

    assert {"T_MCO19B", "T_MCO23B", "T_MCO19C", "T_MCO23C"} <= set(result.counts)
    with db.cursor() as cur:
        for year in ("19", "23"):
            cur.execute(
                f"SELECT count(*) FROM claims.snds_t_mco{year}c c JOIN claims.snds_t_mco{year}b b "
                "USING (eta_num, rsa_num)"
            )
            assert cur.fetchone()[0] > 0
        cur.execute(
            "SELECT DISTINCT table_name FROM ingest.dq_results WHERE table_name LIKE 'claims.snds_t_mco__b' ORDER BY 1"
        )
        assert [row[0] for row in cur.fetchall()] == ["claims.snds_t_mco19b", "claims.snds_t_mco23b"]


def test_the_whole_synthea_csv_export_loads_every_table_and_leaks_no_patient_identity(db, warehouse_url):
    result = run_claims_batch(SYNTHEA_CSV, get_source("synthea_claims"))

    files = sorted(SYNTHEA_CSV.glob("*.csv"))
    assert len(files) == 18 and set(result.counts) == {p.stem for p in files}
    for table, counts in result.counts.items():
        assert (
            counts.rows_read == counts.rows_loaded + counts.rows_quarantined == len(_rows(SYNTHEA_CSV / f"{table}.csv"))
        )
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(DISTINCT o.patient_id) FROM claims.synthea_observations o "
            "JOIN claims.synthea_patients p USING (patient_id)"
        )
        assert cur.fetchone()[0] == len(_rows(SYNTHEA_CSV / "patients.csv"))
        cur.execute("SELECT count(*) FROM claims.synthea_observations WHERE value ~ '^[0-9.]+$'")
        assert cur.fetchone()[0] > 1000, "numeric observation values are kept"

    dump = pg_dump(warehouse_url)
    identity = ["Id", "SSN", "DRIVERS", "PASSPORT", "FIRST", "LAST", "MAIDEN", "BIRTHPLACE", "ADDRESS", "CITY"]
    identity += ["COUNTY", "LAT", "LON"]
    planted = {row[column] for row in _rows(SYNTHEA_CSV / "patients.csv") for column in identity if row[column]}
    assert len(planted) > 60
    found = sorted(value for value in planted if value in dump or value.lower() in dump.lower())
    assert found == [], "patient identity in the warehouse"


def test_ndjson_files_named_anyhow_load_by_their_content(tmp_path, db):
    from conftest import sample_line_counts
    from health_ingest.batch.fhir import run_fhir_batch

    delivery = tmp_path / "export"
    delivery.mkdir()
    patients = (SAMPLE_FOLDER / "Patient.000.ndjson").read_bytes().splitlines(keepends=True)
    (delivery / "Patient1.ndjson").write_bytes(b"".join(patients[:5]))
    (delivery / "1.Patient.ndjson").write_bytes(b"".join(patients[5:]))
    (delivery / "x.ndjson.gz").write_bytes(gzip.compress((SAMPLE_FOLDER / "Encounter.000.ndjson").read_bytes()))
    (delivery / "5d41402abc4b2a76b9719d911017c592.ndjson").write_bytes(
        (SAMPLE_FOLDER / "Condition.000.ndjson").read_bytes()
    )

    result = run_fhir_batch(delivery, get_source("smart_sample"))

    expected = sample_line_counts()
    assert {t: c.rows_loaded for t, c in result.counts.items()} == {
        t: expected[t] for t in ("Patient", "Encounter", "Condition")
    }
    with db.cursor() as cur:
        cur.execute("SELECT file_name, resource_type, status FROM ingest.batch_files ORDER BY file_name")
        files = cur.fetchall()
        cur.execute("SELECT count(*) FROM fhir.encounter e JOIN fhir.patient p ON p.patient_id = e.patient_id")
        assert cur.fetchone()[0] == expected["Encounter"], "every encounter's subject resolves"
    assert set(files) == {
        ("1.Patient.ndjson", "Patient", "loaded"),
        ("Patient1.ndjson", "Patient", "loaded"),
        ("file-002.ndjson", "Condition", "loaded"),  # a hash may be an id: shown under its number
        ("file-004.ndjson.gz", "Encounter", "loaded"),
    }


def test_a_file_mixing_two_resource_types_is_refused_with_its_name_and_line(tmp_path, db):
    from health_ingest.batch.fhir import run_fhir_batch
    from health_ingest.errors import LoadError

    delivery = tmp_path / "export"
    delivery.mkdir()
    patients = (SAMPLE_FOLDER / "Patient.000.ndjson").read_bytes().splitlines(keepends=True)
    encounter = (SAMPLE_FOLDER / "Encounter.000.ndjson").read_bytes().splitlines(keepends=True)[0]
    (delivery / "Patient-0001.ndjson").write_bytes(b"".join([*patients[:2], encounter, *patients[2:4]]))

    with pytest.raises(LoadError, match=r"Patient-0001\.ndjson: line 3: a resource of type Encounter in a file of"):
        run_fhir_batch(delivery, get_source("smart_sample"))
    with db.cursor() as cur:
        cur.execute("SELECT status, error FROM ingest.batches")
        status, error = cur.fetchone()
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'fhir'")
        assert cur.fetchone()[0] == 0, "nothing of the delivery is visible"
    assert status == "failed" and "Patient-0001.ndjson: line 3" in error


def test_an_incremental_pull_with_nothing_new_commits_an_empty_batch_and_moves_since(db):
    from bulk_server import BulkDataServer, Scenario
    from health_ingest.batch.load import pull_and_load
    from health_ingest.sources.bulk.settings import BulkSettings
    from health_ingest.sources.registry import Source

    with BulkDataServer(SAMPLE_FOLDER, Scenario(polls_before_ready=0)) as server:
        settings = BulkSettings(url=server.base_url, types=("Patient",), min_poll_seconds=0.01)
        source = Source(name="quiet_day", kind="fhir", format="ndjson", bulk=settings)
        first, loaded = pull_and_load(source)
        time.sleep(0.01)  # the second export's transaction time comes after the first's
        second, empty = pull_and_load(source)

        assert loaded.rows_loaded == server.count("Patient") and server.kickoff_requests[1]["params"]["_since"]
        assert second.files == [] and empty.status == "committed" and empty.rows_read == 0
        with db.cursor() as cur:
            cur.execute("SELECT status, rows_read, commit_seq FROM ingest.batches ORDER BY commit_seq")
            assert [row[:2] for row in cur.fetchall()] == [("committed", server.count("Patient")), ("committed", 0)]
            cur.execute("SELECT since, export_status_url FROM ingest.source_state WHERE source = 'quiet_day'")
            since, in_flight = cur.fetchone()
        assert since == datetime.fromisoformat(second.transaction_time.replace("Z", "+00:00")) and in_flight is None
        assert second.transaction_time > first.transaction_time
