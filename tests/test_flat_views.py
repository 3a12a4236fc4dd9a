"""Flat tables follow committed batches, replace rows per resource, and rebuild from the JSONB alone."""

from __future__ import annotations

import pytest
from conftest import SAMPLE, scans_of
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.views.flat import rebuild, refresh_batch, repository_views

pytestmark = pytest.mark.integration

REQUIRED = {
    "patient",
    "encounter",
    "observation",
    "condition",
    "procedure",
    "medication_request",
    "immunization",
    "claim",
    "explanation_of_benefit",
}


def _counts(db) -> dict[str, int]:
    with db.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'flat' ORDER BY 1")
        tables = [row[0] for row in cur.fetchall()]
        counts = {}
        for table in tables:
            cur.execute(f"SELECT count(*) FROM flat.{table}")
            counts[table] = cur.fetchone()[0]
    return counts


def test_repository_keeps_the_required_view_definitions():
    assert {view.name for view in repository_views()} >= REQUIRED


def test_a_refresh_checks_its_batch_rows_through_the_batch_index(db, smart_source, suite_plans):
    """The flat suites read the refreshed batch's rows by its id: their cost does not grow with the flat tables."""
    first = run_fhir_batch(SAMPLE, smart_source)
    refresh_batch(db, first.batch_id)
    with db.cursor() as cur:  # a warehouse's worth of encounters from other batches
        cur.execute("INSERT INTO flat.encounter SELECT e.* FROM flat.encounter e, generate_series(1, 40)")
        cur.execute("UPDATE flat.encounter SET resource_id = gen_random_uuid()::text, batch_id = gen_random_uuid()")
        cur.execute("ANALYZE flat.encounter")
    second = run_fhir_batch(SAMPLE, smart_source)
    suite_plans.clear()
    assert refresh_batch(db, second.batch_id)["encounter"] == 1215
    scans = [scans_of(plan, "encounter") for plan in suite_plans]
    assert [s for s in scans if s] in ([["Index Scan"]], [["Bitmap Heap Scan"]]), "one scan, through an index"


def test_flat_tables_are_refreshed_per_batch_and_rebuildable(db, smart_source):
    first = run_fhir_batch(SAMPLE, smart_source)
    written = refresh_batch(db, first.batch_id)
    expected = {
        "patient": 13,
        "encounter": 1215,
        "condition": 555,
        "procedure": 2056,
        "medication_request": 1745,
        "immunization": 161,
    }
    assert {name: written[name] for name in expected} == expected
    assert "claim" not in written, "no Claim resources: no table yet"

    second = run_fhir_batch(SAMPLE, smart_source)  # a re-delivery
    refresh_batch(db, second.batch_id)
    assert {k: v for k, v in _counts(db).items() if k in expected} == expected, "rows replaced, not duplicated"
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM flat.encounter e JOIN flat.patient p ON p.patient_id = e.patient_id "
            "WHERE e.subject_id = p.id AND e.batch_id = %s",
            (second.batch_id,),
        )
        assert cur.fetchone()[0] == 1215, "encounters join their patient by reference and by person pseudonym"
        cur.execute("SELECT count(*) FROM flat.patient WHERE gender IS NULL OR birth_date !~ '^[0-9]{4}$'")
        assert cur.fetchone()[0] == 0, "birth dates are generalised to the year"

    with db.cursor() as cur:
        cur.execute("TRUNCATE flat.encounter")
    rebuild(db)
    assert {k: v for k, v in _counts(db).items() if k in expected} == expected
