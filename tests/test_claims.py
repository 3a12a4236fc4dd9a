"""Claims: SNDS, Synthea CSV and CMS RIF load typed and keyed; identifiers are pseudonymised and link to FHIR."""

from __future__ import annotations

import csv
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import TEST_DATA, announced_undeclared, into_inbox, pg_dump
from health_ingest import config
from health_ingest.batch import claims as claims_loader
from health_ingest.batch.claims import run_claims_batch
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.errors import LoadError
from health_ingest.sources.registry import get_source

pytestmark = pytest.mark.integration

SNDS = TEST_DATA / "synthetic-snds"
DCIR_KEY = [
    "DCT_ORD_NUM",
    "FLX_DIS_DTD",
    "FLX_EMT_NUM",
    "FLX_EMT_ORD",
    "FLX_EMT_TYP",
    "FLX_TRT_DTD",
    "ORG_CLE_NUM",
    "PRS_ORD_NUM",
    "REM_TYP_AFF",
]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def _flat_snds(tmp_path: Path) -> Path:
    folder = tmp_path / "snds"
    folder.mkdir()
    for path in SNDS.glob("*/*.csv"):
        shutil.copy(path, folder / path.name)
    return folder


def test_every_snds_table_loads_and_the_dcir_join_keeps_its_rows(tmp_path, db):
    delivery = _flat_snds(tmp_path)
    result = run_claims_batch(delivery, get_source("snds_extract"))

    csv_tables = {p.stem for p in delivery.glob("*.csv")}
    assert set(result.counts) == csv_tables and len(csv_tables) >= 55
    for table, counts in result.counts.items():
        assert counts.rows_read == counts.rows_loaded + counts.rows_quarantined, table
        assert counts.rows_read == len(_rows(delivery / f"{table}.csv")), table
    with db.cursor() as cur:
        cur.execute("SELECT resource_type, rows_read, rows_loaded, rows_quarantined FROM ingest.batch_files")
        assert all(read == loaded + quarantined for _, read, loaded, quarantined in cur.fetchall())

        prs = Counter(tuple(r[k] for k in DCIR_KEY) for r in _rows(delivery / "ER_PRS_F.csv"))
        pha = Counter(tuple(r[k] for k in DCIR_KEY) for r in _rows(delivery / "ER_PHA_F.csv"))
        expected = sum(n * prs[key] for key, n in pha.items())
        on = " AND ".join(f"p.{k.lower()} = d.{k.lower()}" for k in DCIR_KEY)
        cur.execute(f"SELECT count(*) FROM claims.snds_er_prs_f p JOIN claims.snds_er_pha_f d ON {on}")
        assert cur.fetchone()[0] == expected > 0
        cur.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = 'claims' "
            "AND table_name = 'snds_er_prs_f' AND column_name IN ('exe_soi_dtd', 'prs_act_qte', 'bse_rem_mnt') "
            "ORDER BY column_name"
        )
        assert [row[0] for row in cur.fetchall()] == ["numeric", "date", "numeric"]


def test_redelivery_replaces_and_never_duplicates(tmp_path, db):
    delivery = tmp_path / "dcir"
    shutil.copytree(SNDS / "DCIR", delivery)
    first = run_claims_batch(delivery, get_source("snds_extract"))
    second = run_claims_batch(delivery, get_source("snds_extract"))
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT batch_id) FROM claims.snds_er_prs_f")
        rows, batches = cur.fetchone()
    assert rows == first.counts["ER_PRS_F"].rows_loaded and batches == 1
    assert second.counts["ER_PRS_F"].rows_loaded == rows


def test_synthea_claims_join_the_fhir_patients_of_the_same_run(db):
    run_fhir_batch(TEST_DATA / "synthea-ma11" / "fhir", get_source("synthea_fhir"))
    csv_folder = TEST_DATA / "synthea-ma11" / "csv"
    result = run_claims_batch(csv_folder, get_source("synthea_claims"))
    # supplies.csv repeats one row word for word: a table without a key keeps it once and quarantines the copy;
    # Synthea writes NaN for the quality of life of a payer without members: no number, so quarantined too
    nan_payers = sum(1 for row in _rows(csv_folder / "payers.csv") if "NaN" in row.values())
    quarantined = {t: c.rows_quarantined for t, c in result.counts.items() if c.rows_quarantined}
    assert quarantined == {"supplies": 1, "payers": nan_payers} and nan_payers > 0
    with db.cursor() as cur:
        cur.execute("SELECT DISTINCT file_name, reason FROM ingest.quarantine WHERE file_name = 'payers.csv'")
        assert cur.fetchall() == [("payers.csv", "invalid_value")]
        cur.execute("SELECT count(DISTINCT patient_id) FROM fhir.patient")
        fhir_patients = cur.fetchone()[0]
        cur.execute(
            "SELECT count(*), count(DISTINCT c.patient_id) FROM claims.synthea_claims c "
            "JOIN fhir.patient p ON p.patient_id = c.patient_id"
        )
        joined, people = cur.fetchone()
        cur.execute(
            "SELECT count(*) FROM claims.synthea_claims_transactions t "
            "JOIN fhir.patient p ON p.patient_id = t.patient_id"
        )
        transactions = cur.fetchone()[0]
    bundles_with_patients = len(
        [p for p in (TEST_DATA / "synthea-ma11" / "fhir").glob("*.json") if "Information" not in p.name]
    )
    assert people == fhir_patients == bundles_with_patients
    assert joined > 0 and transactions > 0


def test_cms_rif_samples_load(db):
    result = run_claims_batch(TEST_DATA / "cms-rif", get_source("cms_rif"))
    assert {"beneficiary", "carrier", "inpatient", "outpatient", "pde", "snf", "hha", "hospice", "dme"} <= set(
        result.counts
    )
    assert all(c.rows_read == c.rows_loaded + c.rows_quarantined for c in result.counts.values())
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT patient_id) FROM claims.cms_rif_carrier")
        rows, people = cur.fetchone()
        cur.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = 'claims' "
            "AND table_name = 'cms_rif_carrier' AND column_name = 'clm_from_dt'"
        )
        assert cur.fetchone()[0] == "date", "DD-MON-YYYY dates are typed"
    assert rows > 0 and people > 0


def test_bad_rows_are_quarantined_with_file_row_and_reason(tmp_path, db):
    delivery = tmp_path / "bad"
    delivery.mkdir()
    source = SNDS / "DCIR" / "ER_PHA_F.csv"
    lines = source.read_text().splitlines()
    header = lines[0].split(",")
    broken = lines[1].split(",")
    broken[header.index("FLX_DIS_DTD")] = "2019-02-31"  # an impossible date
    wrong_type = lines[2].split(",")
    wrong_type[header.index("PHA_ACT_QSN")] = "douze"
    (delivery / "ER_PHA_F.csv").write_text(
        "\n".join([lines[0], ",".join(broken), ",".join(wrong_type), lines[3] + ",extra", *lines[4:]]) + "\n"
    )
    headers = (SNDS / "DCIR" / "ER_PRS_F.csv").read_text().splitlines()
    no_key = [line.split(",") for line in headers[1:4]]  # a key column empty: an integer, a text, a date
    for row, column in zip(no_key, ["FLX_EMT_NUM", "ORG_CLE_NUM", "FLX_TRT_DTD"], strict=True):
        row[headers[0].split(",").index(column)] = ""
    (delivery / "ER_PRS_F.csv").write_text("\n".join([headers[0], *map(",".join, no_key), *headers[4:]]) + "\n")
    result = run_claims_batch(delivery, get_source("snds_extract"))
    with db.cursor() as cur:
        cur.execute("SELECT file_name, line_number, reason, message FROM ingest.quarantine ORDER BY 1, 2")
        quarantined = cur.fetchall()
    assert quarantined == [
        ("ER_PHA_F.csv", 2, "invalid_value", "FLX_DIS_DTD: not a date (or an impossible one)"),
        ("ER_PHA_F.csv", 3, "invalid_value", "PHA_ACT_QSN: not an integer"),
        ("ER_PHA_F.csv", 4, "wrong_column_count", f"expected {len(header)} values, found {len(header) + 1}"),
        ("ER_PRS_F.csv", 2, "invalid_value", "FLX_EMT_NUM: missing, and part of the key"),
        ("ER_PRS_F.csv", 3, "invalid_value", "ORG_CLE_NUM: missing, and part of the key"),
        ("ER_PRS_F.csv", 4, "invalid_value", "FLX_TRT_DTD: missing, and part of the key"),
    ]
    assert result.rows_read == len(lines) - 1 + len(headers) - 1 == result.rows_loaded + 6


def test_a_quote_left_open_is_quarantined_with_the_line_it_opens_on_and_the_lines_it_took(tmp_path, db):
    """A quote that is never closed takes the lines after it into one value: their row is quarantined under the
    line where it starts, and its message counts the line breaks it holds, so that the lines are not lost unseen."""
    delivery = tmp_path / "dcir"
    delivery.mkdir()
    shutil.copy(SNDS / "DCIR" / "ER_PRS_F.csv", delivery)
    lines = (SNDS / "DCIR" / "ER_PHA_F.csv").read_text().splitlines()
    width = len(lines[0].split(","))
    opened = lines[4].split(",")
    opened[1] = '"' + opened[1]  # line 5
    (delivery / "ER_PHA_F.csv").write_text("\n".join([*lines[:4], ",".join(opened), *lines[5:]]) + "\n")

    result = run_claims_batch(delivery, get_source("snds_extract"))
    breaks = len(lines) - 4  # those ending line 5 and each line after it, all inside the open quote
    with db.cursor() as cur:
        cur.execute("SELECT file_name, line_number, reason, message FROM ingest.quarantine")
        [(file_name, line, reason, message)] = cur.fetchall()
    assert (file_name, line, reason) == ("ER_PHA_F.csv", 5, "wrong_column_count")
    assert message.startswith(f"expected {width} values, found ")
    assert message.endswith(f"; its values hold {breaks} line breaks (a quote not closed?)")
    assert result.counts["ER_PHA_F"].rows_read == 4 and result.counts["ER_PHA_F"].rows_quarantined == 1


def test_an_unknown_table_or_a_wrong_header_fails_clearly_and_writes_nothing(tmp_path, db):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    shutil.copy(SNDS / "DCIR" / "ER_PRS_F.csv", unknown)
    (unknown / "Zebulon_Quarrie.csv").write_text("A,B\n1,2\n")  # a file named after someone, no table's name
    with pytest.raises(
        LoadError, match=r"file 2 of 2 of the delivery \(by name order\) is named after no table"
    ) as failed:
        run_claims_batch(unknown, get_source("snds_extract"))
    assert "Zebulon" not in str(failed.value) and "QUARRIE" not in str(failed.value).upper()

    header = tmp_path / "header"
    header.mkdir()
    text = (SNDS / "DCIR" / "ER_PHA_F.csv").read_text().replace("PHA_ACT_QSN", "PHA_ACT_QSX", 1)
    (header / "ER_PHA_F.csv").write_text(text)
    shutil.copy(SNDS / "DCIR" / "ER_PRS_F.csv", header)
    with pytest.raises(
        LoadError,
        match=r"ER_PHA_F.csv: header does not match the schema of ER_PHA_F: missing "
        r"columns \['PHA_ACT_QSN'\]; unknown columns \['PHA_ACT_QSX'\]",
    ):
        run_claims_batch(header, get_source("snds_extract"))
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'claims'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT status FROM ingest.batches")
        assert {row[0] for row in cur.fetchall()} == {"failed"}


def test_no_beneficiary_identifier_reaches_the_warehouse(tmp_path, warehouse_url, db):
    run_claims_batch(_flat_snds(tmp_path), get_source("snds_extract"))
    run_claims_batch(TEST_DATA / "synthea-ma11" / "csv", get_source("synthea_claims"))
    run_claims_batch(TEST_DATA / "cms-rif", get_source("cms_rif"))
    originals: set[str] = set()
    for path in SNDS.glob("*/*.csv"):
        for row in _rows(path):
            originals |= {row[c] for c in ("BEN_NIR_PSA", "NIR_ANO_17", "BEN_IDT_ANO") if row.get(c)}
    snds_identifiers = len(originals)
    for row in _rows(TEST_DATA / "synthea-ma11" / "csv" / "patients.csv"):
        originals |= {row["Id"], row["SSN"], row["FIRST"], row["LAST"], row["ADDRESS"]} - {""}
    for path in (TEST_DATA / "cms-rif").glob("beneficiary_*.csv"):
        with path.open(encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle, delimiter="|"):
                originals |= {row["BENE_ID"], row["BENE_SRNM_NAME"], row["BENE_GVN_NAME"]} - {""}
    originals = {o for o in originals if len(o) >= 6}  # short codes appear by chance in any dump
    assert snds_identifiers > 10 and len(originals) > 50
    dump = pg_dump(warehouse_url)
    assert sorted(o for o in originals if o in dump)[:5] == []


def test_the_claims_dag_and_the_cli_load_a_delivery(airflow_db, db, tmp_path):
    import os
    import subprocess
    import sys

    from airflow.dag_processing.dagbag import DagBag
    from conftest import PROJECT

    dag = DagBag(dag_folder=str(PROJECT / "dags")).dags["claims_snds_extract"]
    delivery = into_inbox("snds_extract", sorted((SNDS / "DCIR").iterdir()))
    run = dag.test(run_conf={"delivery_path": str(delivery)})
    assert run.state == "success"
    assert announced_undeclared(dag, run) == set(), "every table's Asset is known to Airflow before its event"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "health_ingest",
            "ingest",
            "claims",
            str(TEST_DATA / "synthea-ma11" / "csv"),
            "--source",
            "synthea_claims",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert cli.returncode == 0, cli.stderr
    assert "claims_transactions" in cli.stdout and "ok" in cli.stdout
    with db.cursor() as cur:
        cur.execute("SELECT source, kind, status FROM ingest.batches ORDER BY commit_seq")
        assert cur.fetchall() == [("snds_extract", "claims", "committed"), ("synthea_claims", "claims", "committed")]


def _pha_delivery(tmp_path: Path, cases: list[tuple[str, str]]) -> tuple[Path, list[str]]:
    """ER_PHA_F with one row per (column, value) case, each under its own DCT_ORD_NUM (900000 + case index)."""
    with (SNDS / "DCIR" / "ER_PHA_F.csv").open(newline="") as handle:
        reader = csv.reader(handle)
        header, template = next(reader), next(reader)
    delivery = tmp_path / "shapes"
    delivery.mkdir()
    with (delivery / "ER_PHA_F.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        for index, (column, value) in enumerate(cases):
            row = list(template)
            row[header.index("DCT_ORD_NUM")] = str(900000 + index)
            row[header.index(column)] = value
            writer.writerow(row)
    return delivery, header


@pytest.mark.parametrize("copy_fails", [True, False], ids=["chunk-typed-again-from-text", "usual-rows-copied"])
def test_values_are_typed_by_their_shape_and_text_is_kept_verbatim(tmp_path, db, caplog, monkeypatch, copy_fails):
    """Each value is read the same whatever its route and the server's version. Rows of usual shapes are copied
    straight into typed columns and the others typed from text. A value of usual shape that does not fit (an
    overflow, an impossible date) fails the copy, and the whole chunk is then typed from text."""
    loaded = [
        ("PHA_ACT_QSN", "-3", -3),
        ("PHA_ACT_QSN", "+5", 5),
        ("PHA_ACT_QSN", "007", 7),
        ("PHA_ACT_QSN", " 12 ", 12),
        ("PHA_ACT_QSN", "40.00", 40),
        ("PHA_ACT_PRU", "1.50", "1.50"),
        ("PHA_ACT_PRU", ".5", "0.5"),
        ("PHA_ACT_PRU", "1e3", "1000"),
        ("FLX_TRT_DTD", "2019-12-31", "2019-12-31"),
        ("FLX_TRT_DTD", "20200301", "2020-03-01"),
        ("FLX_TRT_DTD", "01/03/2020", "2020-03-01"),
        ("PHA_CPA_PCP", "a\tb", "a\tb"),
        ("PHA_CPA_PCP", "back\\slash", "back\\slash"),
        ("PHA_CPA_PCP", "two\nlines\r", "two\nlines\r"),
        ("PHA_CPA_PCP", 'quote"d, comma', 'quote"d, comma'),
    ]
    refused = [
        ("PHA_ACT_QSN", "0x1F", "PHA_ACT_QSN: not an integer"),
        ("PHA_ACT_QSN", "1_000", "PHA_ACT_QSN: not an integer"),
        ("PHA_ACT_QSN", "99999999999999999999", "PHA_ACT_QSN: not an integer"),
        ("PHA_ACT_PRU", "Infinity", "PHA_ACT_PRU: not a number"),
        ("PHA_ACT_PRU", "NaN", "PHA_ACT_PRU: not a number"),
        ("PHA_ACT_PRU", "1_000.5", "PHA_ACT_PRU: not a number"),
        ("FLX_TRT_DTD", "infinity", "FLX_TRT_DTD: not a date (or an impossible one)"),
        ("FLX_TRT_DTD", "epoch", "FLX_TRT_DTD: not a date (or an impossible one)"),
        ("FLX_TRT_DTD", "2020-02-30", "FLX_TRT_DTD: not a date (or an impossible one)"),
        ("FLX_TRT_DTD", "2020-1-05", "FLX_TRT_DTD: not a date (or an impossible one)"),
    ]
    if not copy_fails:
        refused = [case for case in refused if case[1] not in {"99999999999999999999", "2020-02-30"}]
        # the workers read the file a line at a time up to its first quote, and the rest is read in order
        monkeypatch.setattr(claims_loader, "RANGE_BYTES", 1)
    cases = [(column, value) for column, value, _ in refused + loaded]  # the refused first: one line each
    delivery, _ = _pha_delivery(tmp_path, cases)
    with caplog.at_level(logging.INFO, logger="health_ingest.batch.claims"):
        result = run_claims_batch(delivery, get_source("snds_extract"))
    assert (result.rows_read, result.rows_loaded, result.rows_quarantined) == (len(cases), len(loaded), len(refused))
    # copied as typed: -3, +5, 007, " 12 ", 1.50, .5, 2019-12-31 and the quoted text; the others typed from text
    routes = "0 copied as typed, 25 typed from text, 1 chunks" if copy_fails else "8 copied as typed, 15 typed from"
    assert f"ER_PHA_F: {routes}" in caplog.text
    with db.cursor() as cur:
        cur.execute("SELECT line_number, reason, message FROM ingest.quarantine ORDER BY line_number")
        assert cur.fetchall() == [
            (2 + index, "invalid_value", message) for index, (_, _, message) in enumerate(refused)
        ]
        for index, (column, value, expected) in enumerate(loaded, start=len(refused)):
            cur.execute(
                f"SELECT {column.lower()}::text FROM claims.snds_er_pha_f WHERE dct_ord_num = %s", (900000 + index,)
            )
            assert cur.fetchone()[0] == str(expected), (column, value)


def test_the_encoding_is_chosen_on_the_whole_file_and_a_file_in_none_fails_at_its_line(tmp_path, db):
    """A Latin-1 export has an ASCII header: an accented value far down the file still reads as Latin-1, the
    profile's second encoding. A file in none of its profile's encodings fails before anything is written, naming
    the line."""
    cases = [("PHA_CPA_PCP", "x")] * 30 + [("PHA_CPA_PCP", "pharmacie générale")]
    delivery, _ = _pha_delivery(tmp_path, cases)
    latin = delivery / "ER_PHA_F.csv"
    latin.write_bytes(latin.read_text(encoding="utf-8").encode("latin-1"))
    result = run_claims_batch(delivery, get_source("snds_extract"))
    assert (result.rows_read, result.rows_loaded) == (31, 31)
    with db.cursor() as cur:
        cur.execute("SELECT pha_cpa_pcp FROM claims.snds_er_pha_f WHERE dct_ord_num = 900030")
        assert cur.fetchone()[0] == "pharmacie générale"

    synthea = tmp_path / "synthea"
    shutil.copytree(TEST_DATA / "synthea-ma11" / "csv", synthea)
    lines = (synthea / "payers.csv").read_bytes().split(b"\n")
    lines[6] = lines[6].replace(b",", b"\xe9,", 1)  # line 7: a byte UTF-8 cannot read, in the profile's only encoding
    (synthea / "payers.csv").write_bytes(b"\n".join(lines))
    with pytest.raises(LoadError, match=r"payers\.csv: not utf-8-sig at line 7; nothing of the delivery was loaded"):
        run_claims_batch(synthea, get_source("synthea_claims"))
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'synthea%'")
        assert cur.fetchone()[0] == 0


@pytest.mark.parametrize("workers", ["2", "1"], ids=["read-by-workers", "read-in-order"])
def test_small_chunks_load_the_same_rows_and_a_key_repeated_chunks_apart_is_quarantined(
    tmp_path, db, monkeypatch, workers
):
    """Each row its own chunk (so its own COPY and typing step), read by the workers a line at a time or in order
    in the batch's process: the batch still reconciles, and a DCIR key that comes again in a later chunk is
    quarantined with the last row kept, as within one chunk."""

    baseline = run_claims_batch(SNDS / "DCIR", get_source("snds_extract")).counts  # one chunk per file
    monkeypatch.setenv("HEALTH_INGEST_WORKERS", workers)
    monkeypatch.setattr(claims_loader, "CHUNK_BYTES", 1)
    monkeypatch.setattr(claims_loader, "RANGE_BYTES", 1)
    monkeypatch.setattr(claims_loader, "CHECK_ROWS", 1)
    delivery = tmp_path / "dcir"
    shutil.copytree(SNDS / "DCIR", delivery)
    prs = delivery / "ER_PRS_F.csv"
    rows = _rows(prs)
    repeated = dict(rows[2], PRS_ACT_QTE="77")
    with prs.open("a", newline="") as out:
        csv.DictWriter(out, fieldnames=list(rows[0])).writerow(repeated)

    counts = run_claims_batch(delivery, get_source("snds_extract")).counts
    assert set(counts) == set(baseline)
    for table, count in counts.items():
        extra = 1 if table == "ER_PRS_F" else 0
        assert (count.rows_read, count.rows_loaded) == (baseline[table].rows_read + extra, baseline[table].rows_loaded)
        assert count.rows_quarantined == baseline[table].rows_quarantined + extra
    key = " AND ".join(f"{k.lower()}::text = %s" for k in DCIR_KEY)
    with db.cursor() as cur:
        cur.execute(f"SELECT prs_act_qte::text FROM claims.snds_er_prs_f WHERE {key}", [repeated[k] for k in DCIR_KEY])
        assert [row[0] for row in cur.fetchall()] == ["77"]
        cur.execute("SELECT count(*) FROM claims.snds_er_prs_f")
        assert cur.fetchone()[0] == baseline["ER_PRS_F"].rows_loaded
        cur.execute("SELECT file_name, line_number FROM ingest.quarantine WHERE reason = 'duplicate_in_batch'")
        assert cur.fetchall() == [("ER_PRS_F.csv", 4)]
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'ingest_staging'")
        assert cur.fetchone()[0] == 0


def test_a_suite_summed_chunk_by_chunk_reaches_the_counts_read_from_the_table(tmp_path, db, monkeypatch):
    """Suites are counted on each typed chunk beside the load, but for the detail tables' check of each row's header
    in ER_PRS_F, counted on each merged chunk in the load transaction; with each row its own chunk, every
    expectation's counts (rows included) are those of the suites read from the warehouse tables after the merges."""
    delivery = tmp_path / "dcir"
    shutil.copytree(SNDS / "DCIR", delivery)
    pha = _rows(delivery / "ER_PHA_F.csv")
    with (delivery / "ER_PHA_F.csv").open("a", newline="") as out:  # a detail row without its header
        csv.DictWriter(out, fieldnames=list(pha[0])).writerow(dict(pha[0], DCT_ORD_NUM="987654321"))

    def results(batch_id: str) -> dict[str, tuple]:
        with db.cursor() as cur:
            cur.execute(
                "SELECT table_name, expectation, success, observed_value->>'element_count', "
                "observed_value->>'unexpected_count', observed_value->>'observed_value' FROM ingest.dq_results "
                "WHERE batch_id = %s",
                (batch_id,),
            )
            return {(table, expectation): rest for table, expectation, *rest in cur.fetchall()}

    summable = claims_loader.counts_by_chunk
    monkeypatch.setattr(claims_loader, "counts_by_chunk", lambda table: False)
    read_from_table = results(run_claims_batch(delivery, get_source("snds_extract")).batch_id)
    monkeypatch.setattr(claims_loader, "counts_by_chunk", summable)
    monkeypatch.setattr(claims_loader, "CHUNK_BYTES", 1)
    monkeypatch.setattr(claims_loader, "RANGE_BYTES", 1)
    monkeypatch.setattr(claims_loader, "CHECK_ROWS", 1)
    summed = results(run_claims_batch(delivery, get_source("snds_extract")).batch_id)  # the same rows again
    assert len({table for table, _ in summed}) == 16 and len(summed) >= 300 and summed == read_from_table
    headers = [key for key in summed if key[1].endswith("(has_er_prs_f)")]
    assert (
        len(headers) == 15
        and summed[("claims.snds_er_pha_f", "expect_column_values_to_be_in_set(has_er_prs_f)")][2] == "1"
    )
    assert any(unexpected not in (None, "0") for _, _, unexpected, _ in summed.values())


def test_a_stored_key_met_chunks_in_merges_the_chunks_before_it_again_by_key(tmp_path, db, monkeypatch):
    """Chunks are plainly inserted while their keys are new. A key stored by an earlier batch, met in the last
    chunk, rolls the table back and merges every chunk again by key: the rows before it are kept, the stored row
    updated, and a bad row quarantined once."""

    rows = _rows(SNDS / "DCIR" / "ER_PRS_F.csv")
    fields = list(rows[0])

    def delivery(name: str, chosen: list[dict[str, str]]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        with (folder / "ER_PRS_F.csv").open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(chosen)
        return folder

    stored = run_claims_batch(delivery("first", rows[-1:]), get_source("snds_extract"))
    assert stored.rows_loaded == 1
    monkeypatch.setattr(claims_loader, "CHUNK_BYTES", 1)  # each row its own chunk
    monkeypatch.setattr(claims_loader, "RANGE_BYTES", 1)
    monkeypatch.setattr(claims_loader, "CHECK_ROWS", 1)
    bad = dict(rows[1], PRS_ACT_QTE="douze")
    updated = dict(rows[-1], PRS_ACT_QTE="77")
    second = run_claims_batch(delivery("second", [rows[0], bad, *rows[2:-1], updated]), get_source("snds_extract"))

    assert (second.rows_read, second.rows_loaded, second.rows_quarantined) == (len(rows), len(rows) - 1, 1)
    key = " AND ".join(f"{k.lower()}::text = %s" for k in DCIR_KEY)
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT batch_id) FROM claims.snds_er_prs_f")
        assert cur.fetchone() == (len(rows) - 1, 1)
        cur.execute(f"SELECT prs_act_qte::text FROM claims.snds_er_prs_f WHERE {key}", [updated[k] for k in DCIR_KEY])
        assert [row[0] for row in cur.fetchall()] == ["77"]
        cur.execute("SELECT line_number, message FROM ingest.quarantine WHERE batch_id = %s", (second.batch_id,))
        assert cur.fetchall() == [(3, "PRS_ACT_QTE: not a number")]


def test_a_reader_failure_after_chunks_were_typed_and_merged_leaves_nothing(tmp_path, db, monkeypatch):
    """ER_PHA_F is merged and ER_PRS_F partly staged and typed when its gzip stream ends too soon: the batch
    fails naming the file, nothing reaches the warehouse, and no staging table is left."""
    import gzip

    import health_ingest.formats.claims as claims_format

    monkeypatch.setattr(claims_loader, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(claims_loader, "CHECK_ROWS", 1)
    delivery = tmp_path / "dcir"
    delivery.mkdir()
    shutil.copy(SNDS / "DCIR" / "ER_PHA_F.csv", delivery)
    rows = _rows(SNDS / "DCIR" / "ER_PRS_F.csv")
    with gzip.open(delivery / "ER_PRS_F.csv.gz", "wt", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for copy in range(300):  # about 2 MB of text: some thirty chunks
            writer.writerows(dict(row, DCT_ORD_NUM=f"{row['DCT_ORD_NUM']}{copy:03d}") for row in rows)
    packed = (delivery / "ER_PRS_F.csv.gz").read_bytes()
    (delivery / "ER_PRS_F.csv.gz").write_bytes(packed[: len(packed) * 3 // 4])

    with pytest.raises(LoadError, match=r"ER_PRS_F\.csv\.gz: the compressed file ends too soon; nothing"):
        run_claims_batch(delivery, get_source("snds_extract"))  # found by the encoding check, before any write
    # a file that turns unreadable after its check (a failing disk) fails while it is read, chunks already merged
    monkeypatch.setattr(claims_format, "first_undecodable_line", lambda path, encoding, label=None: None)
    with pytest.raises(LoadError, match=r"while reading ER_PRS_F\.csv\.gz"):
        run_claims_batch(delivery, get_source("snds_extract"))
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'claims'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'ingest_staging'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT status FROM ingest.batches")
        assert cur.fetchall() == [("failed",), ("failed",)]


def test_a_field_the_csv_reader_cannot_read_fails_the_batch_naming_file_line_and_reason(tmp_path, db):
    """A quoted field over the CSV reader's size limit: the file is read in order from its first quote, and the
    batch fails with the file, the line and the reader's reason (no value), nothing written, no spool left beside
    the landed files."""
    delivery = tmp_path / "dcir"
    shutil.copytree(SNDS / "DCIR", delivery)
    lines = (delivery / "ER_PHA_F.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    cells = lines[2].rstrip("\n").split(",")
    cells[-2] = '"' + "x" * 200_000 + '"'
    lines.insert(3, ",".join(cells) + "\n")
    (delivery / "ER_PHA_F.csv").write_text("".join(lines), encoding="utf-8")

    with pytest.raises(LoadError) as failure:
        run_claims_batch(delivery, get_source("snds_extract"))
    assert str(failure.value).endswith(
        "ER_PHA_F.csv: line 4: not readable as CSV (field larger than field limit (131072)); nothing of the "
        "delivery was loaded"
    )
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'claims'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT status, batch_id::text FROM ingest.batches")
        [(status, batch_id)] = cur.fetchall()
    assert status == "failed"
    landing = config.state_dir() / "landing" / "snds_extract" / batch_id
    landed = sorted(p.name for p in landing.iterdir())
    assert "ER_PHA_F.csv" in landed and not [name for name in landed if ".copy" in name], "no spool left behind"


@pytest.mark.parametrize(
    "cells",
    [
        ["1", "2", "", "2019-12-31", "cbU"],
        ["", "a b", 'x"y', "back\\slash", "(p)", "comma,inside", "tab\tx", "nl\nx", "cr\rx", "\x0b", "\x0c", "é"],
        ["NULL", "()", '""', " ", "\\", ","],
        ["x", "y,z", "", "2"],
        [],
    ],
)
def test_the_row_digest_taken_while_reading_is_the_one_postgresql_takes(db, cells):
    """Rows of a table without a key are told apart by this digest: it must stay md5(ROW(...)::text)."""
    from health_ingest.privacy.claims import row_digest

    with db.cursor() as cur:
        values = ", ".join(["%s::text"] * len(cells)) or "NULL"
        cur.execute(f"SELECT md5(ROW({values})::text)", [cell or None for cell in cells])
        expected = cur.fetchone()[0]
    assert row_digest(cells) == expected
    if not any("\t" in cell for cell in cells):  # the reader's shortcut, with the line it has joined already
        assert row_digest(cells, "\t".join(cells)) == expected


def test_a_detail_table_is_checked_against_its_header_loaded_in_the_same_batch(db):
    """ER_PHA_F's suite checks that each row has its ER_PRS_F header: delivered together, the header table is
    merged first and every detail row finds its header."""
    from health_ingest.config import project_root

    result = run_claims_batch(project_root() / "samples" / "snds-dcir", get_source("snds_extract"))
    assert set(result.counts) == {"ER_PHA_F", "ER_PRS_F"}
    with db.cursor() as cur:
        cur.execute(
            "SELECT success, observed_value FROM ingest.dq_results "
            "WHERE table_name = 'claims.snds_er_pha_f' AND expectation LIKE '%has_er_prs_f%'"
        )
        (success, observed), *others = cur.fetchall()
    assert success is True and others == [], observed


def test_a_key_twice_in_a_redelivery_keeps_its_last_row(tmp_path, db):
    """Both rows of the repeated key update a row of the earlier batch: the last one wins, the other is
    quarantined, and the batch still reconciles."""
    first = run_claims_batch(SNDS / "DCIR", get_source("snds_extract")).counts["ER_PRS_F"]
    delivery = tmp_path / "dcir"
    shutil.copytree(SNDS / "DCIR", delivery)
    rows = _rows(delivery / "ER_PRS_F.csv")
    repeated = dict(rows[2], PRS_ACT_QTE="77")
    with (delivery / "ER_PRS_F.csv").open("a", newline="") as out:
        csv.DictWriter(out, fieldnames=list(rows[0])).writerow(repeated)

    second = run_claims_batch(delivery, get_source("snds_extract"))
    counts = second.counts["ER_PRS_F"]
    assert (counts.rows_read, counts.rows_loaded) == (first.rows_read + 1, first.rows_loaded)
    key = " AND ".join(f"{k.lower()}::text = %s" for k in DCIR_KEY)
    with db.cursor() as cur:
        cur.execute(f"SELECT prs_act_qte::text FROM claims.snds_er_prs_f WHERE {key}", [repeated[k] for k in DCIR_KEY])
        assert [row[0] for row in cur.fetchall()] == ["77"]
        cur.execute("SELECT count(*), count(DISTINCT batch_id) FROM claims.snds_er_prs_f")
        assert cur.fetchone() == (first.rows_loaded, 1)
        cur.execute(
            "SELECT line_number FROM ingest.quarantine WHERE reason = 'duplicate_in_batch' AND batch_id = %s",
            (second.batch_id,),
        )
        assert cur.fetchall() == [(4,)]


def test_a_new_table_is_keyed_and_indexed_once_loaded_and_keeps_the_last_of_a_key_given_twice(tmp_path, db):
    """A table the batch creates gets its key and indexes after its rows; a key twice in that first delivery (a
    whole row twice, for a table keyed by row content) still keeps the last row and quarantines the other."""
    delivery = tmp_path / "dcir"
    shutil.copytree(SNDS / "DCIR", delivery)
    for table, again in [("ER_PRS_F", lambda row: dict(row, PRS_ACT_QTE="77")), ("ER_PHA_F", dict)]:
        rows = _rows(delivery / f"{table}.csv")
        with (delivery / f"{table}.csv").open("a", newline="") as out:
            csv.DictWriter(out, fieldnames=list(rows[0])).writerow(again(rows[2]))

    result = run_claims_batch(delivery, get_source("snds_extract"))
    for table in ("ER_PRS_F", "ER_PHA_F"):
        counts = result.counts[table]
        assert counts.rows_read == len(_rows(delivery / f"{table}.csv"))
        assert counts.rows_read == counts.rows_loaded + counts.rows_quarantined
    key = " AND ".join(f"{k.lower()}::text = %s" for k in DCIR_KEY)
    with db.cursor() as cur:
        cur.execute(
            "SELECT file_name, line_number FROM ingest.quarantine WHERE reason = 'duplicate_in_batch' ORDER BY 1"
        )
        assert cur.fetchall() == [("ER_PHA_F.csv", 4), ("ER_PRS_F.csv", 4)]
        repeated = _rows(delivery / "ER_PRS_F.csv")[-1]
        cur.execute(f"SELECT prs_act_qte::text FROM claims.snds_er_prs_f WHERE {key}", [repeated[k] for k in DCIR_KEY])
        assert [row[0] for row in cur.fetchall()] == ["77"]
        cur.execute(
            "SELECT t.relname, i.indisunique, i.indisprimary, array_agg(a.attname::text ORDER BY k.ord) "
            "FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
            "WHERE t.relname IN ('snds_er_prs_f', 'snds_er_pha_f') GROUP BY 1, 2, 3, i.indexrelid ORDER BY 1, 4"
        )
        indexes = cur.fetchall()
    assert indexes == [
        ("snds_er_pha_f", False, False, ["batch_id"]),
        ("snds_er_pha_f", True, False, ["ingest_source", "ingest_row_sha"]),
        ("snds_er_pha_f", False, False, ["patient_id"]),
        ("snds_er_prs_f", False, False, ["batch_id"]),
        ("snds_er_prs_f", True, True, [k.lower() for k in DCIR_KEY]),
        ("snds_er_prs_f", False, False, ["patient_id"]),
    ]
