"""A delivery with planted bad lines: the good lines load, each bad one is quarantined with line and reason."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from health_ingest.batch.fhir import run_fhir_batch

pytestmark = pytest.mark.integration

SECRET_NAME = "Zebulon-Quarantine-Name"


def _patient(resource_id: str, **extra) -> bytes:
    resource = {"resourceType": "Patient", "id": resource_id, "name": [{"family": SECRET_NAME}], **extra}
    return json.dumps(resource).encode()


def test_bad_lines_are_quarantined_with_line_numbers_and_the_rest_loads(tmp_path, db, smart_source):
    lines = [
        _patient("good-1"),  # 1
        b'{"resourceType": "Patient", "id": "broken", "name": [{"family": "' + SECRET_NAME.encode(),  # 2
        b"[" + _patient("in-an-array") + b"]",  # 3
        json.dumps({"resourceType": "observation-1", "id": "obs-1", "status": "final"}).encode(),  # 4: no type name
        json.dumps({"resourceType": "Patient", "name": [{"family": SECRET_NAME}]}).encode(),  # 5
        b'{"resourceType": "Patient", "id": "latin1", "name": [{"family": "Ren\xe9e"}]}',  # 6
        b"",  # 7: blank, not a record
        _patient("good-2", meta={"lastUpdated": "2024-01-01T00:00:00Z"}),  # 8
        b'{"resourceType": "Patient", "id": "nul", "name": [{"family": "a\\u0000b"}]}',  # 9
        _patient("bad id with spaces"),  # 10
        _patient("bad-instant", meta={"lastUpdated": "2024-13-45T99:00:00Z"}),  # 11
        _patient("good-2", meta={"lastUpdated": "2023-01-01T00:00:00Z"}),  # 12: older duplicate of line 8
    ]
    delivery = tmp_path / "delivery"
    delivery.mkdir()
    (delivery / "Patient.000.ndjson").write_bytes(b"\n".join(lines) + b"\n")

    # nine bad lines of eleven: above the default quarantine ceiling, so this source lifts it to see each one
    lenient = replace(smart_source, quality=replace(smart_source.quality, quarantine_ceiling=1.0))
    result = run_fhir_batch(delivery, lenient)

    assert (result.rows_read, result.rows_loaded, result.rows_quarantined) == (11, 2, 9)
    with db.cursor() as cur:
        cur.execute("SELECT file_name, line_number, reason, message FROM ingest.quarantine ORDER BY line_number")
        quarantined = cur.fetchall()
        cur.execute("SELECT rows_read, rows_loaded, rows_quarantined, status FROM ingest.batches")
        assert cur.fetchone() == (11, 2, 9, "committed")
        cur.execute("SELECT resource->'meta'->>'lastUpdated' FROM fhir.patient ORDER BY 1 NULLS FIRST")
        assert [row[0] for row in cur.fetchall()] == [None, "2024-01-01T00:00:00Z"]

    assert [(line, reason) for _, line, reason, _ in quarantined] == [
        (2, "invalid_json"),
        (3, "not_an_object"),
        (4, "wrong_resource_type"),
        (5, "missing_id"),
        (6, "invalid_utf8"),
        (9, "nul_character"),
        (10, "invalid_id"),
        (11, "invalid_last_updated"),
        (12, "duplicate_in_batch"),
    ]
    assert {name for name, *_ in quarantined} == {"Patient.000.ndjson"}
    assert "resourceType not a valid type name in a file of Patient" in quarantined[2][3]
    # a record of another resource type is not quarantined: the file mixes types and the batch refuses it
    # (tests/test_deliveries.py)
    for *_, message in quarantined:
        assert SECRET_NAME not in message and "broken" not in message and "obs-1" not in message


def test_a_delivery_without_ndjson_files_fails_before_anything_is_written(tmp_path, db, smart_source):
    from health_ingest.errors import LoadError

    (tmp_path / "README.txt").write_text("not an export")
    with pytest.raises(LoadError, match="holds no NDJSON file"):
        run_fhir_batch(tmp_path, smart_source)
    with db.cursor() as cur:
        cur.execute("SELECT status, error FROM ingest.batches")
        status, error = cur.fetchone()
    assert status == "failed" and "holds no NDJSON file" in error
