"""Deliveries as they really arrive: the SNDS as its published tree (PMSI included, one table per year), a Synthea
run's whole CSV export, NDJSON files named anyhow."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from conftest import TEST_DATA, pg_dump
from health_ingest.formats.claims import load_profile
from health_ingest.pipeline_claims import run_claims_batch
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
