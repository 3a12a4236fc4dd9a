"""Strict FHIR validation: the specification's own rules, measured against the reference validator's verdicts."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SAMPLE, sample_line_counts
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.quality import invariants
from health_ingest.quality.policy import QualityPolicy
from hl7_cases import Case, load_cases

pytestmark = pytest.mark.integration
# the cases are single invalid resources to be quarantined one by one, not deliveries to reject as a whole
NO_CEILING = 1.0


def test_every_constraint_of_the_specification_is_evaluated_or_out_of_scope_by_the_written_rule():
    source = invariants.source()
    assert source["fhirVersion"] == "4.0.1" and "CC0" in source["licence"] and source["origin"]
    spec = invariants._specification()
    out = invariants.out_of_scope()
    assert len(spec.constraints) > 200
    for ident in spec.constraints:
        if ident in out:
            assert out[ident].startswith(("uses ", "no FHIRPath"))
        else:
            assert spec.compiled(ident) is not None, f"{ident} is in scope, so the engine compiles it"
    # the datatype invariants and the resource invariants the issue names are in scope
    assert {"per-1", "ras-2", "bdl-7", "dom-3", "ext-1", "ref-1"}.isdisjoint(out)
    assert len(out) < len(spec.constraints) // 10


def test_strict_mode_agrees_with_the_reference_validator_on_every_case_in_scope(tmp_path, db, smart_source):
    """Every R4 JSON case of the HL7 validator suite's extract, loaded through the pipeline under its manifest
    options: the cases the reference rejects are quarantined and those it accepts load, except the cases whose
    reference errors are all terminology or profile findings (the rule of `hl7_cases.out_of_scope_finding`)."""
    cases = load_cases("visible")
    verdicts = _verdicts(cases, tmp_path, db, smart_source)
    in_scope = [c for c in cases if not c.out_of_scope]
    agree = [c.name for c in in_scope if verdicts[c.name] == c.expected]
    print(f"\nagreement with the reference validator: {len(agree)} of {len(in_scope)} cases in scope")
    assert {c.name: verdicts[c.name] for c in in_scope} == {c.name: c.expected for c in in_scope}
    assert len(in_scope) >= 45 and sum(c.expected == "quarantined" for c in in_scope) >= 20


def test_strict_mode_on_the_suites_other_cases(tmp_path, db, smart_source):
    """The suite's other R4 JSON cases that need no package, profile or supporting file, kept apart while the
    rules were written. The figure is reported; the disagreements left are the reference validator's checks of
    conformance resources against other definitions (search parameters, code-system properties, ECL, snapshots,
    signatures), which strict mode does not make."""
    cases = load_cases("held-out")
    verdicts = _verdicts(cases, tmp_path, db, smart_source)
    in_scope = [c for c in cases if not c.out_of_scope]
    agree = sum(verdicts[c.name] == c.expected for c in in_scope)
    wrongly_rejected = [c.name for c in in_scope if c.expected == "loaded" and verdicts[c.name] != "loaded"]
    print(f"\nheld-out cases: {agree} of {len(in_scope)} in scope agree ({len(cases) - len(in_scope)} out of scope)")
    assert wrongly_rejected == [], "strict mode rejects nothing the reference accepts"
    assert agree >= 56


# A valid Patient and a valid document Bundle; each fault below breaks one rule of one kind.
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "text": {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml"><a href="#n1">name</a> <span id="n1">x</span></div>',
    },
    "contained": [{"resourceType": "Organization", "id": "org1", "name": "o"}],
    "managingOrganization": {"reference": "#org1"},
    "telecom": [
        {
            "system": "phone",
            "value": "1",
            "period": {"start": "2022-11-06T01:52:06-04:00", "end": "2022-11-06T01:07:06-05:00"},  # in order
            "extension": [
                {"url": "http://hl7.org/fhir/StructureDefinition/iso21090-TEL-address", "valueUrl": "tel:+1"}
            ],
        }
    ],
}
PATIENT_URL = "urn:uuid:22222222-2222-4222-8222-222222222222"
DOCUMENT = {
    "resourceType": "Bundle",
    "id": "b1",
    "type": "document",
    "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
    "timestamp": "2020-01-01T00:00:00Z",
    "link": [{"relation": "self", "url": "http://hospital.test/Bundle/b1"}],
    "entry": [
        {
            "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
            "resource": {
                "resourceType": "Composition",
                "id": "c1",
                "status": "final",
                "type": {"text": "note"},
                "date": "2020-01-01",
                "title": "note",
                "author": [{"reference": PATIENT_URL}],
                "subject": {"reference": PATIENT_URL},
            },
        },
        {"fullUrl": PATIENT_URL, "resource": {"resourceType": "Patient", "id": "p2"}},
    ],
}


def _fault(base: dict, change) -> dict:
    resource = copy.deepcopy(base)
    change(resource)
    return resource


def _second_self_link(b):
    b["link"].append({"relation": "self", "url": "http://hospital.test/Bundle/b2"})


def _duplicate_full_url(b):
    b["entry"].append({"fullUrl": PATIENT_URL, "resource": {"resourceType": "Patient", "id": "p3"}})


def _duplicate_id(b):
    b["entry"].append(
        {"fullUrl": "urn:uuid:33333333-3333-4333-8333-333333333333", "resource": b["entry"][1]["resource"]}
    )


def _long_contained_id(p):
    p["contained"][0]["id"] = "o" * 65
    p["managingOrganization"]["reference"] = "#" + "o" * 65


def _uri_for_url(p):
    p["telecom"][0]["extension"][0] = {"url": p["telecom"][0]["extension"][0]["url"], "valueUri": "tel:+1"}


# fault kind -> (the faulty resource, the rule's id, the element's path)
FAULTS = {
    "invariant of a datatype": (
        _fault(PATIENT, lambda p: p["telecom"][0]["period"].update(start="2022-11-06T01:52:06-06:00")),
        "per-1",
        "Patient.telecom[0].period",
    ),
    "invariant of a resource": (
        _fault(PATIENT, lambda p: p.pop("managingOrganization")),
        "dom-3",
        "Patient",
    ),
    "fullUrl not absolute": (
        _fault(DOCUMENT, lambda b: b["entry"][1].update(fullUrl="Patient/p2")),
        "bundle-fullurl",
        "Bundle.entry[1].fullUrl",
    ),
    "fullUrl twice": (_fault(DOCUMENT, _duplicate_full_url), "bdl-7", "Bundle"),
    "resource id twice": (_fault(DOCUMENT, _duplicate_id), "bundle-duplicate-id", "Bundle.entry[2].resource.id"),
    "self link twice": (_fault(DOCUMENT, _second_self_link), "bundle-self-link", "Bundle.link"),
    "reference that does not resolve": (
        _fault(
            DOCUMENT, lambda b: b["entry"][0]["resource"]["subject"].update(reference="urn:uuid:9" + PATIENT_URL[10:])
        ),
        "bundle-reference",
        "Bundle.entry[0].resource.subject.reference",
    ),
    "contained id over 64 characters": (
        _fault(PATIENT, _long_contained_id),
        "id-format",
        "Patient.contained[0].id",
    ),
    "narrative link that does not resolve": (
        _fault(PATIENT, lambda p: p["text"].update(div=p["text"]["div"].replace("#n1", "#n2"))),
        "narrative-link",
        "Patient.text.div",
    ),
    "extension value of a type its definition does not allow": (
        _fault(PATIENT, _uri_for_url),
        "extension-value-type",
        "Patient.telecom[0].extension[0].valueUri",
    ),
}


def _resolves_twice() -> dict:
    bundle = copy.deepcopy(DOCUMENT)
    bundle["entry"][0]["resource"]["subject"] = {"reference": "Patient/p2"}
    bundle["entry"][0]["resource"]["author"] = [{"reference": "Patient/p2"}]
    bundle["entry"][1]["fullUrl"] = "http://hospital.test/Patient/p2"
    bundle["entry"].append(
        {"fullUrl": "http://hospital.test/Patient/p2", "resource": {"resourceType": "Patient", "id": "p2"}}
    )
    bundle["entry"][2]["resource"]["meta"] = {"versionId": "2"}  # a second version: bdl-7 allows it
    bundle["entry"][0]["fullUrl"] = "http://hospital.test/Composition/c1"
    return bundle


FAULTS["reference that resolves twice"] = (
    _resolves_twice(),
    "bundle-reference",
    "Bundle.entry[0].resource.author[0].reference",
)


def test_each_fault_kind_is_quarantined_with_its_rule_and_path_and_the_same_resource_without_it_loads(
    tmp_path, db, smart_source
):
    good = {"Patient": [PATIENT], "Bundle": [DOCUMENT]}
    lines: dict[str, list[dict]] = {"Patient": [copy.deepcopy(PATIENT)], "Bundle": [copy.deepcopy(DOCUMENT)]}
    expected: dict[tuple[str, int], tuple[str, str, str]] = {}
    for number, (kind, (resource, rule, path)) in enumerate(FAULTS.items()):
        resource = copy.deepcopy(resource)
        resource["id"] = f"fault-{number}"
        lines[resource["resourceType"]].append(resource)
        expected[(f"{resource['resourceType']}.ndjson", len(lines[resource["resourceType"]]))] = (kind, rule, path)
    delivery = _write(tmp_path / "faults", lines)
    source = replace(smart_source, quality=QualityPolicy(strict=True, suites=False, quarantine_ceiling=NO_CEILING))
    result = run_fhir_batch(delivery, source)
    assert result.rows_loaded == len(good)
    assert result.rows_quarantined == len(FAULTS)
    # a warning is counted, not quarantined: the good Bundle's entries have no narrative (dom-6)
    assert result.strict_warnings.get("dom-6", 0) >= 2
    assert result.to_summary()["strict_warnings"] == result.strict_warnings
    with db.cursor() as cur:
        cur.execute(
            "SELECT file_name, line_number, reason, message FROM ingest.quarantine WHERE batch_id = %s",
            (result.batch_id,),
        )
        found = {(f, n): (reason, message) for f, n, reason, message in cur.fetchall()}
    assert set(found) == set(expected)
    for where, (kind, rule, path) in expected.items():
        reason, message = found[where]
        assert reason == "invalid_fhir", kind
        assert f"rule {rule} failed at {path}:" in message, (kind, message)


def test_the_bundled_sample_loads_whole_under_strict_validation(db, smart_source):
    """Valid records are not quarantined: the sample's 7,160 resources pass every rule (dates across time zones,
    contained resources, references)."""
    source = replace(smart_source, quality=QualityPolicy(strict=True, suites=False, quarantine_ceiling=NO_CEILING))
    result = run_fhir_batch(SAMPLE, source)
    assert result.rows_read == sum(sample_line_counts().values())
    assert result.rows_quarantined == 0
    print(f"\nstrict warnings on the sample: {result.strict_warnings}")
    assert not [key for key in result.strict_warnings if key.endswith(":not-evaluated")], "the engine never fails"


def test_json_with_comments_loads_only_when_the_source_allows_it(tmp_path, db, smart_source):
    line = '{"resourceType": "Patient", /* exported by a system that comments */ "id": "c1", "active": true}\n'
    delivery = tmp_path / "comments"
    delivery.mkdir()
    (delivery / "Patient.ndjson").write_text(line)
    plain = replace(smart_source, quality=QualityPolicy(strict=True, suites=False, quarantine_ceiling=NO_CEILING))
    assert run_fhir_batch(delivery, plain).rows_quarantined == 1
    allowing = replace(
        smart_source,
        quality=QualityPolicy(strict={"allow_comments": True}, suites=False, quarantine_ceiling=NO_CEILING),
    )
    assert run_fhir_batch(delivery, allowing).rows_loaded == 1


# --- helpers ------------------------------------------------------------------------------------


def _write(folder: Path, resources: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for resource_type, items in resources.items():
        (folder / f"{resource_type}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in items))
    return folder


def _line_of(case: Case, number: int, seen: set) -> tuple[str, bytes]:
    """A case as one NDJSON line: its resource type (Basic when it names none) and the line. A case file spread
    over lines keeps its comments, as block comments, and its errors."""
    try:
        resource = json.loads(case.raw.decode("utf-8-sig"))
        resource_type = resource["resourceType"]
        resource.setdefault("id", f"case-{number}")  # the warehouse needs an id; exports always have one
        if (resource_type, resource["id"]) in seen:
            resource["id"] = f"case-{number}"  # cases reuse ids; a delivery must not
        seen.add((resource_type, resource["id"]))
        return resource_type, json.dumps(resource).encode()
    except (ValueError, KeyError, TypeError):
        text = case.raw.decode("utf-8-sig", "replace")
        text = re.sub(r"(?m)^(\s*)//(.*)$", lambda m: m.group(1) + "/*" + m.group(2).replace("*/", "") + "*/", text)
        text = re.sub(r'"id"\s*:\s*"[^"]*"', f'"id": "case-{number}"', text, count=1)  # cases reuse ids
        named = re.search(r'"resourceType"\s*:\s*"([A-Za-z]+)"', text)
        return (named.group(1) if named else "Basic"), text.replace("\r", " ").replace("\n", " ").encode()


def _verdicts(cases: list[Case], tmp_path: Path, db, smart_source) -> dict[str, str]:
    """Each case's verdict through the pipeline: one batch per set of options."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(json.dumps(case.options, sort_keys=True), []).append(case)
    verdicts: dict[str, str] = {}
    seen: set = set()
    for number, (options, group) in enumerate(sorted(groups.items())):
        lines: dict[str, list[bytes]] = {}
        where: dict[tuple[str, int], str] = {}
        for case in group:
            resource_type, line = _line_of(case, len(seen) + len(where), seen)
            lines.setdefault(resource_type, []).append(line)
            where[(f"{resource_type}.ndjson", len(lines[resource_type]))] = case.name
        delivery = tmp_path / f"cases-{number}"
        delivery.mkdir()
        for resource_type, items in lines.items():
            (delivery / f"{resource_type}.ndjson").write_bytes(b"\n".join(items) + b"\n")
        # the validator's cases are single resources, not a patient record: clinical suites do not apply
        source = replace(
            smart_source, quality=QualityPolicy(strict=json.loads(options), suites=False, quarantine_ceiling=NO_CEILING)
        )
        result = run_fhir_batch(delivery, source)
        assert result.rows_read == len(group)
        with db.cursor() as cur:
            cur.execute(
                "SELECT file_name, line_number, message FROM ingest.quarantine WHERE batch_id = %s",
                (result.batch_id,),
            )
            for file_name, line_number, message in cur.fetchall():
                assert message
                verdicts[where[(file_name, line_number)]] = "quarantined"
        for name in where.values():
            verdicts.setdefault(name, "loaded")
    return verdicts
