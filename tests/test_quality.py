"""The quality gate: every suite can reject a batch, warnings commit, results and Data Docs explain why."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import PROJECT, SAMPLE, scans_of
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.errors import BatchRejected
from health_ingest.quality.policy import QualityPolicy
from health_ingest.quality.suites import load_suites

pytestmark = pytest.mark.integration

PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1980-04-02"}
SUBJECT = {"reference": "Patient/p1"}

# One planted bad batch per suite: each breaks one of the suite's error expectations.
PLANTED = {
    "fhir._default": (
        "Location",
        {"resourceType": "Location", "id": "l1", "meta": {"lastUpdated": "2999-01-01T00:00:00Z"}},
    ),
    "fhir.patient": ("Patient", {**PATIENT, "gender": "robot"}),
    "fhir.encounter": (
        "Encounter",
        {
            "resourceType": "Encounter",
            "id": "e1",
            "status": "finished",
            "subject": SUBJECT,
            "class": {"code": "AMB"},
            "period": {"start": "2020-01-02T10:00:00Z", "end": "2020-01-01T10:00:00Z"},
        },
    ),
    "fhir.observation": (
        "Observation",
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "subject": SUBJECT,
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "effectiveDateTime": "1970-05-05T00:00:00Z",
        },
    ),
    "fhir.condition": (
        "Condition",
        {
            "resourceType": "Condition",
            "id": "c1",
            "subject": SUBJECT,
            "onsetDateTime": "2020-01-02",
            "abatementDateTime": "2019-01-01",
        },
    ),
    "fhir.procedure": (
        "Procedure",
        {
            "resourceType": "Procedure",
            "id": "pr1",
            "status": "completed",
            "subject": SUBJECT,
            "performedPeriod": {"start": "2020-01-02", "end": "2020-01-01"},
        },
    ),
    "fhir.medicationrequest": (
        "MedicationRequest",
        {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "subject": SUBJECT},
    ),
    "fhir.immunization": (
        "Immunization",
        {"resourceType": "Immunization", "id": "i1", "status": "given", "patient": SUBJECT},
    ),
    "fhir.documentreference": (
        "DocumentReference",
        {"resourceType": "DocumentReference", "id": "d1", "status": "draft", "subject": SUBJECT},
    ),
    "fhir.claim": (
        "Claim",
        {
            "resourceType": "Claim",
            "id": "cl1",
            "patient": SUBJECT,
            "created": "2020-01-01",
            "total": {"value": -12.5, "currency": "EUR"},
            "item": [{"sequence": 1}],
        },
    ),
    "fhir.explanationofbenefit": (
        "ExplanationOfBenefit",
        {"resourceType": "ExplanationOfBenefit", "id": "eob1", "patient": SUBJECT, "outcome": "maybe"},
    ),
}


def _deliver(folder: Path, resources: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for resource_type, items in resources.items():
        (folder / f"{resource_type}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in items))
    return folder


def test_every_suite_in_the_repository_has_a_planted_bad_batch():
    assert {suite.name for suite in load_suites().values()} == set(PLANTED)


@pytest.mark.parametrize("suite_name", sorted(PLANTED))
def test_each_suite_rejects_its_planted_bad_batch(suite_name, tmp_path, db, smart_source):
    resource_type, bad = PLANTED[suite_name]
    delivery = _deliver(
        tmp_path / "bad",
        {"Patient": [PATIENT], resource_type: [bad]} if resource_type != "Patient" else {"Patient": [bad]},
    )
    with pytest.raises(BatchRejected, match="data quality"):
        run_fhir_batch(delivery, smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT status FROM ingest.batches")
        assert cur.fetchall() == [("rejected",)]
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'fhir'")
        assert cur.fetchone()[0] == 0, "nothing of the batch is visible"
        cur.execute("SELECT table_name, severity FROM ingest.dq_results WHERE NOT success")
        failed = cur.fetchall()
    assert (f"fhir.{resource_type.lower()}", "error") in failed


def test_observation_before_birth_is_rejected_with_its_reason_and_data_docs(tmp_path, db, smart_source):
    delivery = _deliver(tmp_path / "d", {"Patient": [PATIENT], "Observation": [PLANTED["fhir.observation"][1]]})
    with pytest.raises(
        BatchRejected, match=r"fhir.observation expect_column_values_to_be_between\(years_after_birth\)"
    ):
        run_fhir_batch(delivery, smart_source)
    with db.cursor() as cur:
        cur.execute(
            "SELECT category, observed_value->>'unexpected_count' FROM ingest.dq_results "
            "WHERE NOT success AND expectation = 'expect_column_values_to_be_between(years_after_birth)'"
        )
        assert cur.fetchall() == [("plausibility", "1")]
        cur.execute("SELECT dq_report FROM ingest.batches")
        (report,) = cur.fetchone()
    index = Path(report).read_text()
    assert "FAILED" in index
    assert "expect_column_values_to_be_between(years_after_birth): 1 of 1 values unexpected" in index, "and why"
    page = next(a.split('"')[1] for a in index.split("<a href=")[1:] if "observation" in a)
    html = Path(page).read_text()
    assert "years_after_birth" in html and "Failed" in html, "the page shows the failed expectation"
    # readable offline: nothing from a CDN, the stylesheet beside the pages, the run named, parameters evaluated
    for written, text in ((Path(report), index), (Path(page), html)):
        assert not re.search(r"(?:\bsrc=|<link\b[^>]*\bhref=)[\"']https?://", text), written
        stylesheet = re.search(r"<link rel=[\"']stylesheet[\"'] href=[\"']([^\"']+)", text)[1]
        assert (written.parent / stylesheet).is_file()
    assert "__none__" not in html and f"batch-{report.split('/')[-1].removesuffix('.html')}" in html
    assert "$PARAMETER" not in html and "half_of_previous_batch" not in html


def test_a_patient_stored_by_an_earlier_batch_is_the_one_checked_against(tmp_path, db, smart_source):
    """The suites read the stored patients a batch refers to (by id), and a staged Patient wins over a stored one."""
    observation = PLANTED["fhir.observation"][1]  # 1970, before the patient's birth in 1980
    run_fhir_batch(_deliver(tmp_path / "patient", {"Patient": [PATIENT]}), smart_source)
    with pytest.raises(BatchRejected, match=r"expect_column_values_to_be_between\(years_after_birth\)"):
        run_fhir_batch(_deliver(tmp_path / "later", {"Observation": [observation]}), smart_source)

    born_earlier = {**PATIENT, "birthDate": "1960-04-02"}
    both = _deliver(tmp_path / "both", {"Patient": [born_earlier], "Observation": [observation]})
    assert run_fhir_batch(both, smart_source).rows_loaded == 2


def test_a_suite_reaches_stored_patients_by_the_ids_its_rows_refer_to(tmp_path, db, smart_source, suite_plans):
    """A warehouse holds far more patients than a batch refers to: the suites look the referenced ones up by key
    instead of reading them all, and still check against them."""
    run_fhir_batch(_deliver(tmp_path / "patient", {"Patient": [PATIENT]}), smart_source)
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO fhir.patient (id, batch_id, resource) "
            "SELECT 'other-' || n, batch_id, resource FROM fhir.patient, generate_series(1, 50000) n"
        )
        cur.execute("ANALYZE fhir.patient")
    suite_plans.clear()
    observation = PLANTED["fhir.observation"][1]  # 1970, before the patient's birth in 1980
    with pytest.raises(BatchRejected, match=r"expect_column_values_to_be_between\(years_after_birth\)"):
        run_fhir_batch(_deliver(tmp_path / "later", {"Observation": [observation]}), smart_source)

    assert [scans_of(plan, "patient") for plan in suite_plans] in ([["Index Scan"]], [["Bitmap Heap Scan"]])


def test_warnings_commit_and_are_recorded(tmp_path, db, smart_source):
    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "subject": SUBJECT,
        "period": {"start": "2020-01-01T10:00:00Z"},
    }  # no class: a completeness warning
    run_fhir_batch(_deliver(tmp_path / "d", {"Patient": [PATIENT], "Encounter": [encounter]}), smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT status FROM ingest.batches")
        assert cur.fetchall() == [("committed",)]
        cur.execute("SELECT expectation, category FROM ingest.dq_results WHERE NOT success AND severity = 'warning'")
        assert ("expect_column_values_to_not_be_null(class_code)", "completeness") in cur.fetchall()


def test_a_source_tolerance_lets_a_few_bad_values_through(tmp_path, db, smart_source):
    good = {"resourceType": "Immunization", "status": "completed", "patient": SUBJECT}
    items = [{**good, "id": f"i{n}"} for n in range(299)] + [{**good, "id": "bad", "status": "given"}]
    delivery = _deliver(tmp_path / "d", {"Patient": [PATIENT], "Immunization": items})
    with pytest.raises(BatchRejected):
        run_fhir_batch(delivery, smart_source)
    tolerant = replace(smart_source, quality=QualityPolicy(tolerance=0.005))
    assert run_fhir_batch(delivery, tolerant).rows_loaded == 301


def test_the_sample_passes_every_suite_and_the_suites_are_fast(db, smart_source):
    result = run_fhir_batch(SAMPLE, smart_source)
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT success AND severity = 'error') FROM ingest.dq_results"
        )
        total, errors = cur.fetchone()
    assert total > 80 and errors == 0
    assert result.times.suites > 0, "the time spent in the suites is measured and recorded"


def test_the_suites_are_valid_great_expectations_suites():
    import logging

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    for path in sorted((PROJECT / "expectations").rglob("*.json")):
        document = json.loads(path.read_text())
        suite = gx.ExpectationSuite(
            name=document["name"],
            expectations=[
                gx.expectations.registry.get_expectation_impl(e["type"])(**e["kwargs"], meta=e["meta"])
                for e in document["expectations"]
            ],
        )
        assert len(suite.expectations) == len(document["expectations"]), path.name


def test_the_gate_agrees_with_great_expectations_on_every_expectation(tmp_path, warehouse_url, db, smart_source):
    """The gate evaluates the suites in SQL for speed; Great Expectations, given the same rows, must agree."""
    import logging

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    from health_ingest.batch.fhir import chunk_encoder
    from health_ingest.privacy.keyring import load_keyring
    from health_ingest.quality.suites import evaluate_batch, suite_ctes, suite_for
    from health_ingest.warehouse import staging

    batch_id = "00000000-0000-4000-8000-000000000001"
    encoder = chunk_encoder(load_keyring(), smart_source)
    bad_observation = dict(PLANTED["fhir.observation"][1])
    deliveries = {
        "Patient": [json.dumps(PATIENT).encode(), *(SAMPLE / "Patient.000.ndjson").read_bytes().splitlines()],
        "Encounter": [
            json.dumps(PLANTED["fhir.encounter"][1]).encode(),
            *(SAMPLE / "Encounter.000.ndjson").read_bytes().splitlines(),
        ],
        "Observation": [json.dumps(bad_observation).encode()],
        "Condition": (SAMPLE / "Condition.000.ndjson").read_bytes().splitlines(),
    }
    with db.cursor() as cur:
        for file_no, (resource_type, lines) in enumerate(deliveries.items(), start=1):
            table = staging.create_staging_table(cur, batch_id, resource_type)
            chunk = encoder.encode(file_no, resource_type, list(enumerate(lines, start=1)))
            spool = tmp_path / f"{resource_type}.copy"
            spool.write_bytes(chunk.data)
            staging.copy_files(cur, table, [spool])
        types = list(deliveries)
        ours = evaluate_batch(cur, batch_id, smart_source.name, types)
        queries = {
            t: f"SELECT * FROM ({suite_ctes(cur, suite_for(t), batch_id, t, types)} SELECT * FROM q) AS staged"
            for t in types
        }

    context = gx.get_context(mode="ephemeral")
    source = context.data_sources.add_sql(
        "warehouse", connection_string=warehouse_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    )
    theirs = []
    for resource_type in types:
        suite = suite_for(resource_type)
        asset = source.add_query_asset(resource_type, query=queries[resource_type])
        batch = asset.add_batch_definition_whole_table("all").get_batch()
        for expectation in suite.expectations:
            if expectation["type"] == "expect_table_row_count_to_be_between":
                continue  # its bound is a runtime parameter (the previous batch), absent here
            kwargs = {k: v for k, v in expectation["kwargs"].items()}
            implementation = gx.expectations.registry.get_expectation_impl(expectation["type"])
            theirs.append(batch.validate(implementation(**kwargs)).success)
    ours_compared = [o.success for o in ours if o.expectation["type"] != "expect_table_row_count_to_be_between"]
    assert ours_compared == theirs
    assert False in ours_compared, "the planted rows make some expectations fail, in both engines"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-01-02T03:04:05Z", "2024-01-02 03:04:05+00"),
        ("2024-01-02T03:04:05.123+02:00", "2024-01-02 01:04:05.123+00"),
        ("2024-01-02", "2024-01-02 00:00:00+00"),
        ("2024-02-30T00:00:00Z", None),
        ("2024-13-01", None),
        ("12024-01-01", None),
        ("today", None),
        ("01/02/2024", None),
        ("epoch", None),
        ("2024-01-02 garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_suite_timestamps_read_iso_dates_only(db, value, expected):
    """What the suites compare (an end after its start, an event after birth): NULL for what is not an ISO date
    and time, whichever route the server takes."""
    with db.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
        cur.execute("SELECT ingest.try_timestamptz(%s)::text", (value,))
        assert cur.fetchone()[0] == expected
