"""FHIR Bundles as input: Synthea's transaction bundles load with every reference resolved."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from conftest import TEST_DATA, references_in
from health_ingest.batch.fhir import run_fhir_batch

pytestmark = pytest.mark.integration

BUNDLES = TEST_DATA / "synthea-ma11" / "fhir"
LITERAL = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)/(?P<id>[^/]+)$")


def test_synthea_bundles_load_with_every_reference_resolved(db, smart_source):
    source = replace(smart_source, name="synthea_fhir", id_space="synthea_fhir")
    entries = sum(len(json.loads(p.read_text())["entry"]) for p in BUNDLES.glob("*.json"))

    result = run_fhir_batch(BUNDLES, source)

    assert result.rows_read == entries and result.rows_quarantined == 0
    with db.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'fhir'")
        tables = [row[0] for row in cur.fetchall()]
        stored: set[tuple[str, str]] = set()
        references: list[str] = []
        for table in tables:
            cur.execute(f"SELECT resource FROM fhir.{table}")
            for (resource,) in cur.fetchall():
                stored.add((resource["resourceType"], resource["id"]))
                references.extend(references_in(resource))
        cur.execute("SELECT count(*) FROM ingest.batch_files WHERE status = 'unpacked'")
        assert cur.fetchone()[0] == len(list(BUNDLES.glob("*.json")))
    literal = [LITERAL.match(r) for r in references if not r.startswith("#")]
    assert len(literal) > 10_000
    assert all(literal), "no urn:uuid or conditional reference is left"
    unresolved = [m.group(0) for m in literal if (m["type"], m["id"]) not in stored]
    assert unresolved == []


def test_delivered_file_names_that_may_identify_someone_stay_in_the_landing_zone(warehouse_url, db, smart_source):
    """Synthea names its bundles after the patient (name and id): neither may reach the warehouse."""
    from conftest import pg_dump

    run_fhir_batch(BUNDLES, replace(smart_source, name="synthea_fhir", id_space="synthea_fhir"))
    dump = pg_dump(warehouse_url)
    for bundle in BUNDLES.glob("*.json"):
        for part in bundle.stem.split("_"):
            assert part not in dump, part
    with db.cursor() as cur:
        cur.execute("SELECT file_name FROM ingest.batch_files WHERE status = 'unpacked' ORDER BY file_no")
        assert all(name.startswith("file-") for (name,) in cur.fetchall())
