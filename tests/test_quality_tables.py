"""The suites of the claims and flat tables: one per table, each able to reject a planted bad batch."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SAMPLE, TEST_DATA
from health_ingest.errors import BatchRejected
from health_ingest.formats.claims import PROFILES, load_profile
from health_ingest.quality.policy import QualityPolicy
from health_ingest.quality.suites import load_table_suites

SOURCE_OF_PROFILE = {"snds": "snds_extract", "synthea": "synthea_claims", "cms-rif": "cms_rif"}
CLAIMS_TABLES = [(p, t) for p in PROFILES for t in sorted(load_profile(p).tables)]


def test_every_warehouse_table_the_project_creates_has_a_suite():
    from health_ingest.quality.suites import load_suites
    from health_ingest.views.flat import repository_views

    suites = load_table_suites()
    claims = {f"claims.{load_profile(p).warehouse_table(t)}" for p, t in CLAIMS_TABLES}
    flat = {f"flat.{view.table}" for view in repository_views()}
    assert claims <= set(suites) and flat <= set(suites)
    assert set(suites) == claims | flat, "no suite for a table that does not exist"
    assert "*" in load_suites(), "every FHIR table has at least the default suite"


@pytest.mark.integration
@pytest.mark.parametrize(("profile_name", "table"), CLAIMS_TABLES, ids=[f"{p}:{t}" for p, t in CLAIMS_TABLES])
def test_each_claims_suite_rejects_its_planted_bad_batch(profile_name, table, tmp_path, db):
    from health_ingest.batch.claims import run_claims_batch
    from health_ingest.sources.registry import get_source

    profile = load_profile(profile_name)
    suite = load_table_suites()[f"claims.{profile.warehouse_table(table)}"]
    target, bad_row = _planted_row(profile, table, suite)
    delivery = tmp_path / "planted"
    delivery.mkdir()
    _write_table(profile, table, [bad_row], delivery)
    source = replace(get_source(SOURCE_OF_PROFILE[profile_name]), quality=QualityPolicy())

    with pytest.raises(BatchRejected, match="data quality"):
        run_claims_batch(delivery, source)
    with db.cursor() as cur:
        cur.execute("SELECT status FROM ingest.batches")
        assert cur.fetchall() == [("rejected",)]
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'claims'")
        assert cur.fetchone()[0] == 0, "nothing of the batch is visible"
        cur.execute("SELECT table_name, expectation FROM ingest.dq_results WHERE NOT success AND severity = 'error'")
        failed = cur.fetchall()
    assert (suite.table, target) in failed


@pytest.mark.integration
def test_a_synthetic_extract_is_rejected_by_default_and_downgraded_by_its_source_policy(tmp_path, db):
    """The bundled SNDS extract draws each column on its own; its source records those failures as warnings."""
    from health_ingest.batch.claims import run_claims_batch
    from health_ingest.sources.registry import get_source

    delivery = tmp_path / "snds"
    delivery.mkdir()
    for path in (TEST_DATA / "synthetic-snds").rglob("*.csv"):
        (delivery / path.name).write_bytes(path.read_bytes())
    snds = get_source("snds_extract")
    with pytest.raises(BatchRejected, match=r"claims\.snds_er_prs_f expect_column_values_to_be_between"):
        # the default suites, without the quarantine ceiling (which rejects this extract first: see test_alerts)
        run_claims_batch(delivery, replace(snds, quality=QualityPolicy(quarantine_ceiling=1.0)))
    result = run_claims_batch(delivery, snds)

    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FILTER (WHERE NOT success), count(*) FILTER (WHERE observed_value ? "
            "'downgraded_by_source_policy'), count(*) FILTER (WHERE NOT success AND severity = 'error') "
            "FROM ingest.dq_results WHERE batch_id = %s",
            (result.batch_id,),
        )
        failed, downgraded, errors = cur.fetchone()
    assert errors == 0 and 10 < downgraded <= failed, "every error recorded, as a warning"


@pytest.mark.integration
def test_each_flat_suite_rejects_a_broken_view_and_leaves_its_table_as_it_was(db, smart_source):
    """A ViewDefinition edited badly (every row given the same id) is caught before its rows are visible."""
    from health_ingest.batch.fhir import run_fhir_batch
    from health_ingest.sources.registry import get_source
    from health_ingest.views.flat import FlatView, refresh_batch, repository_views
    from health_ingest.views.runner import ViewRunner

    batches = [
        run_fhir_batch(SAMPLE, smart_source).batch_id,
        run_fhir_batch(TEST_DATA / "synthea-ma11" / "fhir", get_source("synthea_fhir")).batch_id,
    ]
    for batch_id in batches:
        refresh_batch(db, batch_id)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM ingest.dq_results WHERE table_name LIKE 'flat.%%' AND NOT success")
        assert cur.fetchone()[0] == 0, "the sample's flat rows pass every flat suite"
    rejected = []
    for view in repository_views():
        with db.cursor() as cur:
            cur.execute(f"SELECT batch_id::text, count(*) FROM flat.{view.table} GROUP BY 1 ORDER BY 2 DESC LIMIT 1")
            batch_id, _ = cur.fetchone()
            cur.execute(f"SELECT count(*), count(DISTINCT id) FROM flat.{view.table}")
            before = cur.fetchone()
        broken = FlatView(view.name, ViewRunner(_with_constant_id(view.runner.view)))
        with pytest.raises(BatchRejected, match=rf"flat\.{view.table} expect_column_values_to_be_unique\(id\)"):
            refresh_batch(db, batch_id, [broken])
        with db.cursor() as cur:
            cur.execute(f"SELECT count(*), count(DISTINCT id) FROM flat.{view.table}")
            assert cur.fetchone() == before, view.name
        rejected.append(view.name)
    assert len(rejected) == 9, rejected


@pytest.mark.integration
def test_the_rebuild_command_rebuilds_and_a_broken_view_leaves_the_tables_as_they_were(db, smart_source, capsys):
    from health_ingest.batch.fhir import run_fhir_batch
    from health_ingest.cli import main
    from health_ingest.views.flat import FlatView, rebuild, repository_views
    from health_ingest.views.runner import ViewRunner

    run_fhir_batch(SAMPLE, smart_source)
    assert main(["views", "rebuild"]) == 0
    assert "flat.encounter: 1,215 rows rebuilt" in capsys.readouterr().out

    encounter = next(view for view in repository_views() if view.name == "encounter")
    broken = FlatView(encounter.name, ViewRunner(_with_constant_id(encounter.runner.view)))
    with pytest.raises(
        BatchRejected, match=r"flat tables not rebuilt: flat\.encounter expect_column_values_to_be_unique"
    ):
        rebuild(db, [broken])
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT id) FROM flat.encounter")
        assert cur.fetchone() == (1215, 1215)


# --- helpers --------------------------------------------------------------------------------------


def _planted_row(profile, table: str, suite) -> tuple[str, dict[str, str]]:
    """A row of valid values with one error expectation of the suite broken; returns (expectation, row)."""
    schema = profile.tables[table]
    row = {c.name: _valid_value(c.type) for c in schema.columns}
    by_lower = {c.name.lower(): c for c in schema.columns}
    for expectation in suite.expectations:
        if expectation["meta"]["severity"] != "error":
            continue
        kind, kwargs = expectation["type"], expectation["kwargs"]
        column = by_lower.get(kwargs.get("column", ""))
        label = f"{kind}({kwargs.get('column', '')})"
        if kind == "expect_column_values_to_be_between" and column is not None:
            if column.type in {"date", "datetime"}:
                row[column.name] = "2150-06-01"
            elif kwargs.get("max_value") is not None:
                row[column.name] = str(int(kwargs["max_value"]) + 1)
            else:
                row[column.name] = str(int(kwargs["min_value"]) - 1)
            return label, row
        if kind == "expect_column_values_to_be_in_set" and kwargs["column"].startswith("has_"):
            return label, row  # a detail delivered without any header
        if kind == "expect_column_values_to_match_regex" and kwargs["column"].endswith("_code"):
            coded = by_lower.get(kwargs["column"].removesuffix("_code"))
            if coded is not None and coded.type == "string":
                row[coded.name] = "not a code"
                return label, row
    raise AssertionError(f"suite {suite.name} has no error expectation a planted row can break")


def _valid_value(kind: str) -> str:
    values = {"integer": "1", "number": "1", "year": "2020", "boolean": "true", "date": "2020-01-02"}
    return values.get(kind, "2020-01-02T00:00:00Z" if kind == "datetime" else "A")


def _write_table(profile, table: str, rows: list[dict], folder: Path) -> None:
    schema = profile.tables[table]
    name = table.upper() if profile.table_names == "upper" else table.lower()
    with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
        delimiter = schema.delimiter or profile.delimiter
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        trailing = [""] if profile.trailing_delimiter else []
        writer.writerow([*schema.column_names, *trailing])
        for row in rows:
            writer.writerow([*(row[c] for c in schema.column_names), *trailing])


def _with_constant_id(definition: dict) -> dict:
    broken = json.loads(json.dumps(definition))

    def walk(selects):
        for select in selects:
            for column in select.get("column", []):
                if column["name"] == "id":
                    column["path"] = "'same-id-for-every-row'"
            walk(select.get("select", []))

    walk(broken["select"])
    return broken
