"""The privacy module's promises: linking, generalisation, date shift, escrow, the k-anonymity gate, re-keying."""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import date

import pytest
from conftest import SAMPLE, TEST_DATA, pg_dump
from health_ingest.batch.fhir import chunk_encoder, run_fhir_batch
from health_ingest.errors import BatchRejected
from health_ingest.privacy.compat import MicrosoftCompatTokeniser
from health_ingest.privacy.dates import DateShifter
from health_ingest.privacy.escrow import ESCROW_PURPOSE
from health_ingest.privacy.generalise import generalise_birth_date, generalise_postal_code
from health_ingest.privacy.keyring import Keyring, MasterKey, load_keyring, read_keyring_file
from health_ingest.privacy.policy import PrivacyPolicy
from health_ingest.privacy.resources import ResourcePseudonymiser
from health_ingest.privacy.tokens import TOKEN_PURPOSE, Tokeniser
from health_ingest.sources.registry import Source

SSN = "http://hl7.org/fhir/sid/us-ssn"
SYNTHEA = TEST_DATA / "synthea-ma11"


def _random_keyring() -> Keyring:
    return Keyring(keys={"k1": MasterKey("k1", secrets.token_bytes(32))}, active_id="k1")


def test_same_person_gets_same_pseudonym_in_fhir_and_claims():
    keyring = load_keyring()
    bundle = json.loads(next((SYNTHEA / "fhir").glob("Christeen33_*.json")).read_text())
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    with (SYNTHEA / "csv" / "patients.csv").open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["Id"] == patient["id"])

    fhir_source = Source(
        name="synthea_fhir",
        kind="fhir",
        format="ndjson",
        id_space="synthea_fhir",
        privacy=PrivacyPolicy(linking_identifiers=(SSN,)),
    )
    from_fhir = chunk_encoder(keyring, fhir_source).pseudonymiser.pseudonymise(patient)
    from_csv = Tokeniser(keyring, id_space="synthea_csv").identifier(SSN, row["SSN"])

    assert from_fhir.patient_id == from_csv
    assert from_fhir.resource_id != from_csv, "the resource id token is the source's own"
    assert row["SSN"] not in json.dumps(patient)


@pytest.mark.integration
def test_every_row_of_a_patient_carries_the_person_pseudonym(db, smart_source):
    run_fhir_batch(SAMPLE, smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(*) FILTER (WHERE patient_id = id) FROM fhir.patient")
        assert cur.fetchone() == (13, 0), "every sample patient has an SSN: none keeps its resource token"
        for table, expected in (("encounter", 1215), ("allergyintolerance", 11), ("procedure", 2056)):
            cur.execute(f"SELECT count(*) FROM fhir.{table} t JOIN fhir.patient p ON p.patient_id = t.patient_id")
            assert cur.fetchone()[0] == expected, table


def test_postal_codes_birth_dates_and_great_ages_are_generalised():
    assert generalise_postal_code("75013", "FR") == "75"
    assert generalise_postal_code("97411", "France") == "974"
    assert generalise_postal_code("02081", "US") == "020"
    assert generalise_postal_code("03601", "US") == "000", "sparse ZIP3 areas are suppressed"
    assert generalise_postal_code("SW1A 1AA", "GB") is None
    assert generalise_birth_date("1982-09-14", precision="year", reference_year=2026) == "1982"
    assert generalise_birth_date("1982-09-14", precision="month", reference_year=2026) == "1982-09"
    assert generalise_birth_date("1921-02-03", precision="month", reference_year=2026) == "1936"


def test_date_shift_keeps_a_patients_intervals_and_is_not_affine_in_the_key():
    keyring = _random_keyring()
    source = Source(name="s", kind="fhir", format="ndjson", privacy=PrivacyPolicy(date_shift_days=365))
    pseudonymiser = chunk_encoder(keyring, source).pseudonymiser
    encounters = [
        json.loads(line)
        for line in (SAMPLE / "Encounter.000.ndjson").read_text().splitlines()
        if "Patient/129c6ac7-8d06-89de-ad63-0204a93e76c3" in line
    ][:50]
    before = [date.fromisoformat(e["period"]["start"][:10]) for e in encounters]
    for encounter in encounters:
        pseudonymiser.pseudonymise(encounter)
    after = [date.fromisoformat(e["period"]["start"][:10]) for e in encounters]
    shifts = {(b - a).days for a, b in zip(before, after, strict=True)}
    assert len(shifts) == 1 and shifts != {0}, "one patient, one non-zero offset"

    patients = [f"patient-{i}" for i in range(40)]
    offsets = [[DateShifter(_random_keyring(), 365).offset_days(p) for p in patients] for _ in range(40)]
    differences = {row[0] - row[1] for row in offsets}
    assert len(differences) > 30, "an affine offset (a*key + b(patient)) would keep differences constant"
    assert len({o for row in offsets for o in row}) > 500, "offsets spread over the range"
    assert all(-365 <= o <= 365 and o != 0 for row in offsets for o in row)


def test_microsoft_compatible_vectors():
    tokeniser = MicrosoftCompatTokeniser("123")
    assert tokeniser.crypto_hash("abc") == "8f16771f9f8851b26f4d460fa17de93e2711c7e51337cb8a608a0f81e1c1b6ae"
    assert ResourcePseudonymiser(tokeniser).rewrite_reference("Patient/example") == (
        "Patient/698d54f0494528a759f19c8e87a9f99e75a5881b9267ee3926bcf62c992d84ba"
    )


def test_pseudonymise_filter_streams_ndjson(tmp_path):
    lines = (SAMPLE / "Patient.000.ndjson").read_bytes() + b"not json\n"
    result = subprocess.run(
        [sys.executable, "-m", "health_ingest", "pseudonymise", "--source", "smart_sample"],
        input=lines,
        capture_output=True,
        env=os.environ.copy(),
    )
    assert result.returncode == 1, "a rejected line makes the exit code say so"
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == 13 and b"line 14: invalid_json" in result.stderr
    assert not any(b"Medhurst46" in line for line in result.stdout.splitlines())


@pytest.mark.integration
def test_k_anonymity_gate_rejects_a_batch_with_a_unique_patient(tmp_path, db, smart_source):
    common = {
        "resourceType": "Patient",
        "gender": "female",
        "birthDate": "1980-01-01",
        "address": [{"country": "US", "postalCode": "02081"}],
    }
    patients = [{**common, "id": f"p{i}"} for i in range(5)]
    patients.append({**common, "id": "unique", "gender": "male", "birthDate": "1931-05-05"})
    (tmp_path / "Patient.ndjson").write_text("\n".join(json.dumps(p) for p in patients) + "\n")
    strict = replace(smart_source, privacy=replace(smart_source.privacy, k_anonymity=5, k_anonymity_action="reject"))

    with pytest.raises(BatchRejected, match=r"1 of 2 groups .* smaller than k=5"):
        run_fhir_batch(tmp_path, strict)
    with db.cursor() as cur:
        cur.execute("SELECT status FROM ingest.batches")
        assert cur.fetchall() == [("rejected",)]
        cur.execute("SELECT to_regclass('fhir.patient')")
        assert cur.fetchone()[0] is None, "the rolled-back batch created nothing"
        cur.execute("SELECT classes, classes_below_k, records_below_k, passed FROM ingest.privacy_checks")
        assert cur.fetchall() == [(2, 1, 1, False)]

    run_fhir_batch(tmp_path, smart_source)  # the demo source only warns
    with db.cursor() as cur:
        cur.execute("SELECT status FROM ingest.batches ORDER BY started_at")
        assert [r[0] for r in cur.fetchall()] == ["rejected", "committed"]


@pytest.mark.integration
def test_escrow_is_readable_only_by_its_role_and_gives_back_the_original(warehouse_url, db, smart_source):
    run_fhir_batch(SAMPLE / "Patient.000.ndjson", smart_source)
    suffix = uuid.uuid4().hex[:8]
    analyst, steward = f"hi_analyst_{suffix}", f"hi_steward_{suffix}"
    with db.cursor() as cur:
        cur.execute(f"CREATE ROLE {analyst} LOGIN")
        cur.execute(f"CREATE ROLE {steward} LOGIN IN ROLE health_ingest_escrow")
    try:
        from health_ingest.warehouse.connection import connect

        def select_as(role: str):
            conn = connect(_as_user(warehouse_url, role))
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT token, domain, ciphertext FROM escrow.identifiers WHERE domain = %s",
                        (f"identifier|{SSN}",),
                    )
                    return cur.fetchall()
            finally:
                conn.close()

        import psycopg2

        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            select_as(analyst)
        rows = select_as(steward)
        assert len(rows) == 13
        from health_ingest.privacy.escrow import EscrowCipher

        cipher = EscrowCipher(load_keyring())
        originals = {cipher.decrypt(domain, bytes(ct)) for _, domain, ct in rows}
        assert "999-94-5397" in originals
        assert not any(b"999-94-5397" in bytes(ct) for _, _, ct in rows)
    finally:
        with db.cursor() as cur:
            cur.execute(f"DROP ROLE {analyst}")
            cur.execute(f"DROP ROLE {steward}")


@pytest.mark.integration
def test_rotation_remaps_every_token_and_leaves_no_old_token(tmp_path, warehouse_url, db, smart_source, monkeypatch):
    keyring_file = tmp_path / "keyring.json"
    assert _cli("keys", "new", "--keyring", str(keyring_file)).returncode == 0
    monkeypatch.setenv("HEALTH_INGEST_KEYRING", str(keyring_file))
    old_key = read_keyring_file(keyring_file).active_id
    run_fhir_batch(SAMPLE, smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT e.patient_id FROM fhir.encounter e ORDER BY e.resource->'period'->>'start' LIMIT 1")
        (first_patient,) = cur.fetchone()
    assert first_patient.startswith(old_key + ".")

    assert _cli("keys", "rotate", "--keyring", str(keyring_file)).returncode == 0
    new_key = read_keyring_file(keyring_file).active_id
    rekey = _cli("warehouse", "rekey")
    assert rekey.returncode == 0, rekey.stderr
    assert "re-keyed 1 batches: 7160 rows" in rekey.stdout

    dump = pg_dump(warehouse_url)
    assert old_key + "." not in dump
    assert dump.count(new_key + ".") > 20_000
    with db.cursor() as cur:
        cur.execute("SELECT key_id, rekeyed_from FROM ingest.batches")
        assert cur.fetchall() == [(new_key, old_key)]
        cur.execute("SELECT count(*) FROM fhir.encounter e JOIN fhir.patient p ON p.patient_id = e.patient_id")
        assert cur.fetchone()[0] == 1215
        cur.execute(
            "SELECT count(*) FROM fhir.encounter e "
            "JOIN fhir.patient p ON e.resource->'subject'->>'reference' = 'Patient/' || p.id"
        )
        assert cur.fetchone()[0] == 1215, "references still resolve after re-keying"


@pytest.mark.integration
def test_no_key_material_in_logs(smart_source, db, caplog):
    keyring = load_keyring()
    secrets_in_any_form = set()
    for key in keyring.keys.values():
        secrets_in_any_form |= {base64.b64encode(key.secret).decode(), key.secret.hex()}
    for purpose in (TOKEN_PURPOSE, ESCROW_PURPOSE, "date-shift"):
        secrets_in_any_form.add(keyring.subkey(purpose).hex())
    with caplog.at_level(logging.DEBUG):
        run_fhir_batch(SAMPLE, smart_source)
        _cli("keys", "list")
    assert caplog.text and not [s for s in secrets_in_any_form if s in caplog.text]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "health_ingest", *args], capture_output=True, text=True, env=os.environ.copy()
    )


def _as_user(url: str, user: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.netloc.split("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))
