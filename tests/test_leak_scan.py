"""Every bundled FHIR and claims input loaded into one warehouse: none of their identifiers (names, address lines,
cities, phones, e-mails, SSNs, passports, driver's licences, MRNs, resource ids, claims identifier and free-text
columns) is in a full dump or in the logs, matched exactly and case-folded."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from dataclasses import replace

import pytest
from conftest import PROJECT, SAMPLE, TEST_DATA, pg_dump
from health_ingest.batch.claims import run_claims_batch
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.formats.claims import load_profile
from health_ingest.privacy.claims import classify_column
from health_ingest.privacy.keyring import load_keyring
from health_ingest.quality.policy import QualityPolicy
from health_ingest.sources.registry import get_source

pytestmark = pytest.mark.integration

PERSON_TYPES = {"Patient", "Practitioner", "RelatedPerson", "Person"}
WORD = re.compile(r"[0-9a-z]+")
SYNTHEA = TEST_DATA / "synthea-ma11"
HL7_CASES = TEST_DATA / "hl7-fhir-test-cases"
CLAIMS_INPUTS = [  # (folder, source, profile)
    (TEST_DATA / "synthetic-snds", "snds_extract", "snds"),
    (PROJECT / "samples" / "snds-dcir", "snds_extract", "snds"),
    (SYNTHEA / "csv", "synthea_claims", "synthea"),
    (TEST_DATA / "cms-rif", "cms_rif", "cms-rif"),
]


def _fhir_identifiers(resource: dict, found: dict[str, set[str]]) -> None:
    """A resource's id, its identifiers' values and, for people, organisations and places, their names, contact
    points and address lines and cities, at any depth (contained resources, Bundle entries)."""
    if isinstance(resource.get("id"), str):
        found["resource id"].add(resource["id"])
    kind = resource.get("resourceType")
    for identifier in _as_list(resource.get("identifier")):
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
            found["identifier (SSN, passport, driver's licence, MRN...)"].add(identifier["value"])
    for name in _as_list(resource.get("name")):
        if isinstance(name, dict):
            found["name"].update(p for p in [name.get("family"), *_as_list(name.get("given"))] if isinstance(p, str))
        elif isinstance(name, str) and kind in {"Organization", "Location"}:
            found["name"].add(name)
    for point in _as_list(resource.get("telecom")):
        if isinstance(point, dict) and isinstance(point.get("value"), str):
            found["phone or e-mail"].add(point["value"])
    for address in _as_list(resource.get("address")):
        if isinstance(address, dict):
            found["address line"].update(line for line in _as_list(address.get("line")) if isinstance(line, str))
            if isinstance(address.get("city"), str):
                found["city"].add(address["city"])
    for contained in _as_list(resource.get("contained")):
        if isinstance(contained, dict):
            _fhir_identifiers(contained, found)


def _first_coding(element: dict) -> dict:
    codings = element.get("code", {}).get("coding") or [{}]
    return {k: v for k, v in codings[0].items() if k in ("code", "system")}


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _claims_identifiers(folder, profile_name: str, found: dict[str, set[str]], kept: list[str]) -> None:
    """The values of every column its profile classifies as an identifier (names and addresses included); the
    values of the columns kept as they are go to `kept`."""
    profile = load_profile(profile_name)
    for path in sorted(folder.rglob("*.csv")):
        table = profile.table_for(path)
        schema = profile.tables[table]
        classes = {c.name: classify_column(table, c, profile.privacy) for c in schema.columns}
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            for row in csv.DictReader(handle, delimiter=schema.delimiter or profile.delimiter):
                for column, value in row.items():
                    if not value or column not in classes:
                        continue
                    if classes[column] == "identifier":
                        found.setdefault(f"{profile_name} {column}", set()).add(value.strip())
                    elif classes[column] in {"code", "amount", "date", "quasi_identifier"}:
                        kept.append(value)


def _code_displays(node, kept: list[str]) -> None:
    """The displays of the codings of a FHIR input: the code systems' own text, kept by design."""
    if isinstance(node, dict):
        if isinstance(node.get("display"), str) and "system" in node:
            kept.append(node["display"])
        for value in node.values():
            _code_displays(value, kept)
    elif isinstance(node, list):
        for item in node:
            _code_displays(item, kept)


def _searchable(value: str) -> bool:
    """Long enough not to appear by chance: a number of 10 digits or more, any other value of 4 characters or more
    (short codes and amounts appear in any dump)."""
    if len(set(value)) < 3:  # 99999999999, a placeholder that any table of numbers holds
        return False
    return len(value) >= 10 if value.replace("-", "").replace(".", "").isdigit() else len(value) >= 4


class Haystack:
    """A text to search: exact, and case-folded on whole words (the words of a value must all be words of the
    text before the slower substring search runs)."""

    def __init__(self, text: str) -> None:
        self.text, self.folded = text, text.casefold()
        self.words = set(WORD.findall(self.folded))

    def holds(self, value: str, *, as_id: bool = False) -> bool:
        """`as_id`: the value is a resource id, found only where an id goes (a JSON value, after a `/` or `#`),
        for test cases name resources with words (`coverage`) that are keys of any resource."""
        words = WORD.findall(value.casefold())
        if not words or not all(w in self.words for w in words):
            return False
        if as_id:
            forms = [f'"{value}"', f'/{value}"', f"#{value}", f"/{value}/"]
            return any(f in self.text or f.casefold() in self.folded for f in forms if f != f'"{value}"') or (
                f': "{value}"' in self.text or f"\t{value}\t" in self.text
            )
        return value in self.text or value.casefold() in self.folded


def _without_tokens(dump: str) -> str:
    """Pseudonyms are random-looking text that holds any short string by chance: they are taken out first."""
    key_ids = "|".join(re.escape(k) for k in load_keyring().keys)
    return re.sub(rf"(?:{key_ids})\.[A-Za-z0-9\-.]{{43}}", " ", dump)


def _hl7_cases_delivery(folder) -> None:
    """The validator cases as one delivery, one NDJSON file per type, as the quality tests load them."""
    folder.mkdir()
    by_type: dict[str, list[str]] = {}
    for number, path in enumerate(sorted((HL7_CASES / "validator").glob("*.json"))):
        try:
            resource = json.loads(path.read_text(encoding="utf-8-sig"))
        except ValueError:
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            continue
        resource["id"] = f"{resource.get('id', 'case')}-{number}"
        by_type.setdefault(resource["resourceType"], []).append(json.dumps(resource))
    for resource_type, lines in by_type.items():
        (folder / f"{resource_type}.ndjson").write_text("\n".join(lines) + "\n")


def test_no_identifier_of_any_bundled_input_reaches_the_warehouse_or_the_logs(tmp_path, warehouse_url, caplog):
    found: dict[str, set[str]] = {
        k: set() for k in ("resource id", "name", "phone or e-mail", "address line", "city")
    } | {"identifier (SSN, passport, driver's licence, MRN...)": set()}
    kept: list[str] = []  # what the inputs hold in what is kept by design: a value found there too proves nothing
    for path in sorted(SAMPLE.glob("*.ndjson")):
        for line in path.read_text().splitlines():
            resource = json.loads(line)
            if "resourceType" in resource:
                _fhir_identifiers(resource, found)
                _code_displays(resource, kept)
    prapare_addresses = []  # Synthea's social-needs screening records the patient's street as an Observation
    for bundle in sorted((SYNTHEA / "fhir").glob("*.json")):
        for entry in json.loads(bundle.read_text())["entry"]:
            _fhir_identifiers(entry["resource"], found)
            _code_displays(entry["resource"], kept)
            observation = entry["resource"] if entry["resource"]["resourceType"] == "Observation" else {}
            for element in [observation, *observation.get("component", [])]:
                if {"code": "56799-0", "system": "http://loinc.org"}.items() <= _first_coding(element).items():
                    prapare_addresses.append(element["valueString"])
    _hl7_cases_delivery(tmp_path / "hl7-cases")
    for path in (tmp_path / "hl7-cases").glob("*.ndjson"):
        for line in path.read_text().splitlines():
            _fhir_identifiers(json.loads(line), found)
            _code_displays(json.loads(line), kept)
    for folder, _, profile_name in CLAIMS_INPUTS:
        _claims_identifiers(folder, profile_name, found, kept)
    by_design = Haystack("\n".join(kept))
    assert len(prapare_addresses) >= 30 and set(prapare_addresses) <= found["address line"]
    for kind in ("name", "address line", "city", "phone or e-mail", "resource id"):
        assert len(found[kind]) >= 20, f"the inputs hold {kind}s"
    assert {"snds BEN_NIR_PSA", "synthea SSN", "synthea PASSPORT", "synthea DRIVERS", "cms-rif BENE_ID"} <= set(found)

    # a delivery folder named after a patient: its name must not be stored or said either
    patient_folder = tmp_path / "Zebediah_Quarrington_1960"
    shutil.copytree(SYNTHEA / "fhir", patient_folder)
    found["delivery folder"] = {"Zebediah_Quarrington_1960", "Zebediah", "Quarrington"}
    smart = get_source("smart_sample")
    cases = replace(smart, name="hl7_cases", id_space="hl7_cases", quality=QualityPolicy(suites=False))
    with caplog.at_level(logging.DEBUG):
        run_fhir_batch(SAMPLE, smart)
        run_fhir_batch(patient_folder, get_source("synthea_fhir"))
        run_fhir_batch(tmp_path / "hl7-cases", cases)
        for folder, source, _ in CLAIMS_INPUTS:
            delivery = tmp_path / f"claims-{source}-{folder.name}"
            delivery.mkdir()
            for path in folder.rglob("*.csv"):
                shutil.copy(path, delivery / path.name)
            run_claims_batch(delivery, get_source(source))

    dump = Haystack(_without_tokens(pg_dump(warehouse_url)))
    logs = Haystack(caplog.text)
    assert "COPY fhir.patient" in dump.text and "COPY claims.synthea_patients" in dump.text
    searched = {kind: {v for v in values if _searchable(v)} for kind, values in found.items()}
    # a synthetic extract draws its values from small pools: the same string may be one table's provider number
    # and another's establishment code; a FHIR test case's name may be a word of a LOINC display
    also_kept = {kind: {v for v in values if by_design.holds(v)} for kind, values in searched.items()}
    leaks = {
        kind: sorted(
            v for v in values - also_kept[kind] if dump.holds(v, as_id=kind == "resource id") or logs.holds(v)
        )[:10]
        for kind, values in searched.items()
    }
    assert {kind: values for kind, values in leaks.items() if values} == {}
    assert sum(map(len, searched.values())) > 20_000
    # (organisations' and payers' ids are codes in the Synthea CSV tables that describe them)
    assert sum(map(len, also_kept.values())) < sum(map(len, searched.values())) / 25
