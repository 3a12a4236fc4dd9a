"""What the pseudonymiser does not understand it does not keep: free text, display-only references, fields of the
wrong shape and the values of Observations coded as identifiers are gone from the warehouse and the logs, while
the resources stay valid FHIR and keep their codes, dates and numbers."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import replace

import pytest
from conftest import pg_dump
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.privacy.element_plan import identifying_codes
from health_ingest.privacy.keyring import load_keyring
from health_ingest.privacy.policy import PrivacyPolicy
from health_ingest.privacy.resources import ResourcePseudonymiser
from health_ingest.privacy.tokens import Tokeniser
from health_ingest.quality.policy import QualityPolicy
from health_ingest.quality.strict import strict_check

LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"
PATIENT = {"reference": "Patient/planted-patient"}
PLANTED: list[str] = []


def strict_problem(resource: dict):
    """Why strict mode would quarantine the resource (None: it loads)."""
    return strict_check(resource).rejection


def plant(where: str) -> str:
    """A made-up identifier, one per position, so that a leak names the position it came from."""
    value = f"Quillfeather{len(PLANTED):02d} {where}"
    PLANTED.append(value)
    return value


def _free_text_resources() -> list[dict]:
    """Valid FHIR R4 resources with an identifier planted in every free-text position the issue lists."""
    observation = {
        "resourceType": "Observation",
        "id": "planted-observation",
        "status": "final",
        "category": [
            {"coding": [{"system": "urn:local:category", "code": "sdoh", "display": plant("coding.display")}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": "93025-5", "display": "PRAPARE"}], "text": plant("code.text")},
        "subject": PATIENT,
        "effectiveDateTime": "2021-03-04T05:06:07Z",
        "performer": [{"display": plant("display-only performer")}],
        "valueString": plant("valueString"),
        "note": [{"text": plant("Annotation.text")}],
        "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{plant("narrative")}</div>'},
        "referenceRange": [{"low": {"value": 1}, "text": plant("referenceRange.text")}],
        "component": [
            {
                "code": {"coding": [{"system": LOINC, "code": "63512-8"}], "text": plant("component code.text")},
                "valueString": plant("component.valueString"),
            },
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                "valueQuantity": {
                    "value": 7.5,
                    "unit": "mm[Hg]",
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]",
                },
            },
        ],
    }
    patient = {
        "resourceType": "Patient",
        "id": "planted-patient",
        "birthDate": "1971-05-06",
        "gender": "female",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": plant("ssn").replace(" ", "-")}],
        "generalPractitioner": [{"display": plant("generalPractitioner display")}],
        "link": [{"other": {"display": plant("link.other display")}, "type": "seealso"}],
        "maritalStatus": {"text": plant("maritalStatus.text")},
        "communication": [
            {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}], "text": plant("lang")}}
        ],
        "extension": [
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3"},
                    },
                    {"url": "text", "valueString": plant("race text")},
                ],
            }
        ],
    }
    return [
        observation,
        patient,
        {
            "resourceType": "QuestionnaireResponse",
            "id": "planted-questionnaire-response",
            "status": "completed",
            "subject": PATIENT,
            "authored": "2021-03-04",
            "item": [{"linkId": "1", "text": plant("item.text"), "answer": [{"valueString": plant("answer")}]}],
        },
        {
            "resourceType": "Communication",
            "id": "planted-communication",
            "status": "completed",
            "subject": PATIENT,
            "sent": "2021-03-04T05:06:07Z",
            "payload": [{"contentString": plant("payload")}],
        },
        {
            "resourceType": "DocumentReference",
            "id": "planted-document",
            "status": "current",
            "subject": PATIENT,
            "date": "2021-03-04T05:06:07Z",
            "description": plant("description"),
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain",
                        "data": base64.b64encode(plant("attachment data").encode()).decode(),
                        "title": plant("attachment title"),
                    }
                }
            ],
        },
        {
            "resourceType": "AllergyIntolerance",
            "id": "planted-allergy",
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}
                ]
            },
            "patient": PATIENT,
            "recordedDate": "2021-03-04",
            "code": {"coding": [{"system": SNOMED, "code": "91936005"}], "text": plant("allergy code.text")},
            "reaction": [
                {
                    "manifestation": [{"coding": [{"system": SNOMED, "code": "271807003"}]}],
                    "description": plant("reaction.description"),
                }
            ],
        },
        {
            "resourceType": "Encounter",
            "id": "planted-encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": PATIENT,
            "period": {"start": "2021-03-04T05:06:07Z", "end": "2021-03-04T06:06:07Z"},
            "participant": [{"individual": {"display": plant("participant.individual display")}}],
            "reasonCode": [{"coding": [{"system": SNOMED, "code": "72892002"}], "text": plant("reasonCode.text")}],
        },
        {
            "resourceType": "Procedure",
            "id": "planted-procedure",
            "status": "completed",
            "subject": PATIENT,
            "performedDateTime": "2021-03-04T05:06:07Z",
            "code": {"coding": [{"system": SNOMED, "code": "73761001"}]},
            "note": [{"authorString": plant("authorString"), "text": plant("procedure note")}],
        },
    ]


def _identifying_observations() -> list[dict]:
    """One Observation per identifying code, its value a coded identifier (a string value goes as free text
    anyway), and a PRAPARE panel whose address component holds a street."""
    observations = []
    for number, (system, code) in enumerate(sorted(identifying_codes())):
        observations.append(
            {
                "resourceType": "Observation",
                "id": f"planted-identifying-{number}",
                "status": "final",
                "code": {"coding": [{"system": system, "code": code}]},
                "subject": PATIENT,
                "effectiveDateTime": "2021-03-04",
                "valueCodeableConcept": {"coding": [{"system": "urn:local", "code": plant(code).replace(" ", "-")}]},
            }
        )
    observations.append(
        {
            "resourceType": "Observation",
            "id": "planted-prapare",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "93025-5"}]},
            "subject": PATIENT,
            "effectiveDateTime": "2021-03-04",
            "component": [
                {"code": {"coding": [{"system": LOINC, "code": "56799-0"}]}, "valueString": plant("12 Elm Row Unit 4")},
                {"code": {"coding": [{"system": LOINC, "code": "63512-8"}]}, "valueInteger": 4},
            ],
        }
    )
    return observations


def _wrongly_shaped_resources() -> list[dict]:
    """Fields whose JSON shape is not the one FHIR R4 defines for them (not valid FHIR, so not under strict mode)."""
    return [
        {
            "resourceType": "Patient",
            "id": "planted-shapes-patient",
            "name": plant("name as a string"),
            "identifier": plant("identifier as a string"),
            "text": plant("text as a string"),
            "managingOrganization": plant("reference as a string"),
            "birthDate": "1980-01-02",
        },
        {
            "resourceType": "Observation",
            "id": "planted-shapes-observation",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8480-6", "display": [plant("display in a list")]}]},
            "category": [[{"text": plant("nested list")}]],
            "subject": {"reference": "Patient/planted-shapes-patient"},
            "effectiveDateTime": "2021-03-04",
            "valueQuantity": {"value": 120, "unit": "mm[Hg]"},
            plant("unknown key").replace(" ", ""): "x",
        },
        {
            "resourceType": "Encounter",
            "id": "planted-shapes-encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Patient/planted-shapes-patient"},
            "participant": [{"individual": plant("individual as a string")}],
        },
    ]


def _write(delivery, resources: list[dict]) -> None:
    delivery.mkdir()
    by_type: dict[str, list[dict]] = {}
    for resource in resources:
        by_type.setdefault(resource["resourceType"], []).append(resource)
    for resource_type, items in by_type.items():
        (delivery / f"{resource_type}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in items))


def _stored(db) -> list[dict]:
    with db.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'fhir'")
        tables = [row[0] for row in cur.fetchall()]
        rows = []
        for table in tables:
            cur.execute(f"SELECT resource FROM fhir.{table}")
            rows.extend(row[0] for row in cur.fetchall())
    return rows


def _found(text: str) -> list[str]:
    folded = text.casefold()
    return [value for value in PLANTED if value in text or value.casefold() in folded or value.split()[0] in text]


@pytest.mark.integration
def test_planted_identifiers_in_free_text_and_identifying_observations_are_gone_and_resources_still_validate(
    tmp_path, warehouse_url, db, smart_source, caplog
):
    PLANTED.clear()
    valid = _free_text_resources() + _identifying_observations()
    assert all(strict_problem(json.loads(json.dumps(r))) is None for r in valid), "the planted resources are valid"
    _write(tmp_path / "valid", valid)
    strict = replace(smart_source, name="planted", id_space="planted", quality=QualityPolicy(strict=True, suites=False))
    with caplog.at_level(logging.DEBUG):
        result = run_fhir_batch(tmp_path / "valid", strict)
    assert result.rows_loaded == len(valid) and result.rows_quarantined == 0

    assert _found(pg_dump(warehouse_url)) == [] and _found(caplog.text) == []
    stored = _stored(db)
    assert [(r["resourceType"], strict_problem(r)) for r in stored if strict_problem(r)] == []
    observations = {r["code"]["coding"][0]["code"]: r for r in stored if r["resourceType"] == "Observation"}
    masked = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "masked"}]}
    for _, code in identifying_codes():
        assert observations[code]["dataAbsentReason"] == masked and "valueCodeableConcept" not in observations[code]
        assert observations[code]["effectiveDateTime"] == "2021-03-04"
    panel = next(
        r
        for r in stored
        if r["resourceType"] == "Observation"
        and len(r.get("component", [])) == 2
        and r["code"]["coding"][0].get("display") == "PRAPARE"
    )
    assert panel["effectiveDateTime"] == "2021-03-04T05:06:07Z" and panel["dataAbsentReason"] == masked
    assert panel["component"][1]["valueQuantity"]["value"] == 7.5 and panel["component"][0]["dataAbsentReason"]
    assert panel["referenceRange"] == [{"low": {"value": 1}}]
    prapare = next(
        r
        for r in stored
        if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "93025-5" and r is not panel
    )
    assert prapare["component"][1]["valueInteger"] == 4 and "valueString" not in prapare["component"][0]
    patient = next(r for r in stored if r["resourceType"] == "Patient")
    assert patient["birthDate"] == "1971" and patient["gender"] == "female"
    assert patient["identifier"][0]["value"].startswith(load_keyring().active_id + ".")
    assert patient["generalPractitioner"][0]["extension"][0]["valueCode"] == "masked"
    with db.cursor() as cur:
        cur.execute("SELECT privacy_removed FROM ingest.batches WHERE batch_id = %s", (result.batch_id,))
        removed = cur.fetchone()[0]
    assert removed["free text"]["Observation.valueString"] == 1
    assert removed["identifying value"]["Observation.valueCodeableConcept"] == len(identifying_codes())
    assert removed["unexpected shape"]["Reference.display"] == 4  # performer, gp, link.other, participant


@pytest.mark.integration
def test_fields_of_the_wrong_shape_are_removed_and_counted(tmp_path, warehouse_url, db, smart_source, caplog):
    PLANTED.clear()
    resources = _wrongly_shaped_resources()
    _write(tmp_path / "shapes", resources)
    source = replace(smart_source, name="shapes", id_space="shapes", quality=QualityPolicy(suites=False))
    with caplog.at_level(logging.DEBUG):
        result = run_fhir_batch(tmp_path / "shapes", source)
    assert result.rows_loaded == len(resources)

    assert _found(pg_dump(warehouse_url)) == [] and _found(caplog.text) == []
    stored = _stored(db)
    assert [(r["resourceType"], strict_problem(r)) for r in stored if strict_problem(r)] == []
    observation = next(r for r in stored if r["resourceType"] == "Observation")
    assert observation["code"]["coding"][0]["code"] == "8480-6" and observation["valueQuantity"]["value"] == 120
    with db.cursor() as cur:
        cur.execute("SELECT privacy_removed FROM ingest.batches WHERE batch_id = %s", (result.batch_id,))
        shapes = cur.fetchone()[0]["unexpected shape"]
    assert {
        "Patient.identifier",
        "Patient.managingOrganization",
        "Coding.display",
        "Observation.category",
        "Observation.(unknown element)",
        "EncounterParticipant.individual",
    } <= set(shapes)


def test_a_source_keeps_a_free_text_path_on_purpose_and_a_wrong_path_is_refused():
    observation = _free_text_resources()[0]
    keeping = ResourcePseudonymiser(
        Tokeniser(load_keyring(), id_space="s"),
        PrivacyPolicy(keep_free_text=("Observation.valueString", "Observation.code.text")),
    )
    keeping.pseudonymise(observation)
    assert observation["valueString"].endswith("valueString") and observation["code"]["text"].endswith("code.text")
    assert "text" not in observation["component"][0]["code"], "only the named path is kept"
    assert "dataAbsentReason" not in observation
    for wrong in ("Observation.valueQuantity", "Observation.nothing", "observation.valueString", "Observation"):
        with pytest.raises(ValueError, match="keep_free_text"):
            ResourcePseudonymiser(Tokeniser(load_keyring(), id_space="s"), PrivacyPolicy(keep_free_text=(wrong,)))


def test_the_element_table_is_the_one_the_installed_fhir_models_define():
    from health_ingest.privacy.elements import TABLE_FILE, build_table

    stored = json.loads((__import__("importlib").resources.files("health_ingest.privacy") / TABLE_FILE).read_text())
    built = build_table()
    assert stored["types"] == built["types"]
    assert stored["types"]["Observation"]["valueString"] == ["string", 0, 0]
    assert stored["types"]["CommunicationPayload"]["contentString"] == ["string", 0, 2]  # one of a required choice
    assert stored["types"]["Annotation"]["text"] == ["markdown", 0, 1]
