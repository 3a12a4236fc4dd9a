"""No original identifier of the sample reaches the warehouse or the logs; pseudonyms keep references intact."""

from __future__ import annotations

import base64
import logging
import re

import pytest
from conftest import SAMPLE, pg_dump, references_in, sample_identifiers, sample_resources
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.privacy.keyring import load_keyring
from health_ingest.privacy.resources import ResourcePseudonymiser
from health_ingest.privacy.tokens import Tokeniser

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@pytest.mark.integration
def test_warehouse_dump_and_logs_hold_no_original_identifier(warehouse_url, smart_source, caplog):
    identifiers = sample_identifiers()
    for kind in ("Social Security Number", "Passport Number", "Driver's license number"):
        assert len(identifiers[kind]) >= 10, f"the sample should carry {kind}s"
    assert len(identifiers["resource id"]) == 7160

    with caplog.at_level(logging.DEBUG):
        run_fhir_batch(SAMPLE, smart_source)
    dump = pg_dump(warehouse_url)
    assert "COPY fhir.patient" in dump and len(dump) > 1_000_000

    leaks = {kind: sorted(v for v in values if v in dump) for kind, values in identifiers.items()}
    assert {kind: found for kind, found in leaks.items() if found} == {}
    logged = caplog.text
    assert {kind: [v for v in values if v in logged] for kind, values in identifiers.items()} == {
        kind: [] for kind in identifiers
    }


@pytest.mark.integration
def test_clinical_notes_do_not_reach_the_warehouse(warehouse_url, smart_source):
    notes = []
    for resource in sample_resources():
        for content in resource.get("content", []):
            data = content.get("attachment", {}).get("data")
            if data:
                notes.append(base64.b64decode(data).decode("utf-8", "replace"))
    assert len(notes) > 1000
    run_fhir_batch(SAMPLE, smart_source)
    dump = pg_dump(warehouse_url)
    long_lines = {line.strip() for note in notes for line in note.splitlines() if len(line.strip()) > 40}
    assert long_lines and not [line for line in long_lines if line in dump][:5]


def _pseudonymiser(id_space: str = "smart_sample") -> ResourcePseudonymiser:
    return ResourcePseudonymiser(Tokeniser(load_keyring(), id_space=id_space))


def test_tokens_are_fhir_ids_that_carry_the_key_id():
    tokeniser = Tokeniser(load_keyring(), id_space="s")
    token = tokeniser.resource_id("Patient", "129c6ac7-8d06-89de-ad63-0204a93e76c3")
    assert FHIR_ID.match(token) and token.startswith(load_keyring().active_id + ".")
    assert tokeniser.identifier("http://hl7.org/fhir/sid/us-ssn", "999-94-5397") != tokeniser.identifier(
        "urn:oid:2.16.840.1.113883.4.3.25", "999-94-5397"
    ), "one domain per identifier system"
    assert tokeniser.resource_id("Patient", "x") != Tokeniser(load_keyring(), id_space="t").resource_id("Patient", "x")


def test_every_reference_that_resolved_before_still_resolves_after():
    resources = list(sample_resources())
    originals = {(r["resourceType"], r["id"]) for r in resources}
    pseudonymiser = _pseudonymiser()
    before, after, ids_after = [], [], set()
    for resource in resources:
        references = [ref for ref in references_in(resource) if re.match(r"^[A-Z][A-Za-z]+/[^/]+$", ref)]
        resolved = [tuple(ref.split("/")) in originals for ref in references]
        pseudonymised = pseudonymiser.pseudonymise(resource)
        ids_after.add((resource["resourceType"], pseudonymised.resource_id))
        rewritten = [ref for ref in references_in(resource) if re.match(r"^[A-Z][A-Za-z]+/[^/]+$", ref)]
        before.extend(resolved)
        after.extend(rewritten)
    assert sum(before) > 10_000 and all(before)
    assert len(after) == len(before)
    assert all(tuple(ref.split("/")) in ids_after for ref in after)


def test_conditional_references_stay_resolvable_by_identifier():
    pseudonymiser = _pseudonymiser()
    npi = "http://hl7.org/fhir/sid/us-npi"
    practitioner = {"resourceType": "Practitioner", "id": "p", "identifier": [{"system": npi, "value": "9999945"}]}
    encounter = {
        "resourceType": "Encounter",
        "id": "e",
        "participant": [{"individual": {"reference": f"Practitioner?identifier={npi}|9999945", "display": "Dr. X"}}],
    }
    pseudonymiser.pseudonymise(practitioner)
    pseudonymiser.pseudonymise(encounter)
    token = practitioner["identifier"][0]["value"]
    assert encounter["participant"][0]["individual"] == {"reference": f"Practitioner?identifier={npi}|{token}"}


def test_patient_resources_lose_names_contacts_and_unknown_extensions():
    patient = next(r for r in sample_resources() if r["resourceType"] == "Patient" and r["birthDate"] > "1950")
    birth_year = patient["birthDate"][:4]
    _pseudonymiser().pseudonymise(patient)
    assert not {"name", "telecom", "text", "photo", "contact"} & patient.keys()
    assert patient["birthDate"] == birth_year
    assert all(set(a) <= {"use", "type", "state", "country", "postalCode"} for a in patient["address"])
    assert {e["url"].rsplit("/", 1)[-1] for e in patient["extension"]} <= {
        "us-core-race",
        "us-core-ethnicity",
        "us-core-birthsex",
    }
    assert {"code": "PSEUDED"}.items() <= patient["meta"]["security"][-1].items()


@pytest.mark.parametrize("key_length", [0, 32, 64, 65, 200])
def test_the_token_mac_is_hmac_sha256(key_length):
    """Tokens must stay what they were: the precomputed-pad MAC is exactly HMAC-SHA256."""
    import hmac
    import os

    from health_ingest.privacy.tokens import keyed_sha256

    key = os.urandom(key_length)
    mac = keyed_sha256(key)
    for message in (b"", b"identifier|urn:oid:2.16.840.1.113883.4.1\x1f999-12-3456", os.urandom(300)):
        assert mac(message) == hmac.digest(key, message, "sha256")


def test_a_token_is_the_key_id_and_the_url_safe_base64_of_its_mac_with_dots():
    """Tokens must stay what they were: the MAC as `urlsafe_b64encode` writes it, unpadded, with "_" spelled "."
    (over enough MACs that "-" and "." show)."""
    import hmac

    from health_ingest.privacy.tokens import TOKEN_PURPOSE

    keyring = load_keyring()
    tokeniser = Tokeniser(keyring, id_space="s")
    key = keyring.subkey(TOKEN_PURPOSE)
    seen = set()
    for value in [f"value-{n}" for n in range(3000)]:
        mac = hmac.digest(key, f"identifier|urn:x\x1f{value}".encode(), "sha256")
        expected = base64.urlsafe_b64encode(mac).rstrip(b"=").replace(b"_", b".").decode("ascii")
        assert tokeniser.identifier("urn:x", value) == f"{keyring.active_id}.{expected}"
        seen.update(expected)
    assert {"-", ".", "A", "z", "0"} <= seen and "_" not in seen and "=" not in seen
