"""The walk's shorter ways through References, Codings and CodeableConcepts give what the full walk of their tables
gives: the same resource, byte for byte, and the same removal counts, on every resource of the bundled FHIR inputs
and on seeded variants of them whose elements have other shapes (extra or missing keys, values of the wrong type,
empty or odd lists, untrusted code systems)."""

from __future__ import annotations

import json
import random
from collections import Counter

import orjson
import pytest
from conftest import SAMPLE, TEST_DATA
from health_ingest.errors import RecordProblem
from health_ingest.privacy.keyring import load_keyring
from health_ingest.privacy.policy import PrivacyPolicy
from health_ingest.privacy.resources import ResourcePseudonymiser
from health_ingest.privacy.tokens import Tokeniser

# shapes put in place of a value, or beside one, near those the shorter ways take
ODD_VALUES = [
    42,
    1.5,
    True,
    None,
    "",
    "Quillfeather Jane",
    [],
    {},
    ["x"],
    [None],
    [{}],
    {"reference": "Patient/p1"},
    {"reference": "Patient/p1", "display": "Jane"},
    {"reference": "Patient/p1", "display": 7},
    {"reference": "Patient/p1", "type": "Patient"},
    {"reference": ["Patient/p1"]},
    {"display": "Jane"},
    {"identifier": {"system": "urn:x", "value": "1"}, "display": "Jane"},
    {"system": "http://loinc.org", "code": "1234-5", "display": "A code's name"},
    {"system": "urn:local:codes", "code": "1", "display": "Jane"},
    {"system": "http://loinc.org", "code": "1"},
    {"system": "http://loinc.org", "code": 1, "display": "x"},
    {"system": "http://loinc.org", "display": "x", "version": "2.7"},
    {"system": ["http://loinc.org"], "code": "1", "display": "x"},
    {"coding": []},
    {"coding": [{"system": "http://snomed.info/sct", "code": "1", "display": "x"}], "text": "Jane"},
    {"coding": [{"system": "urn:local:codes", "code": "1", "display": "Jane"}, "not a coding"]},
    {"coding": [{"system": "http://snomed.info/sct", "code": "1", "display": "x", "userSelected": True}]},
    {"coding": {"system": "http://snomed.info/sct", "code": "1"}, "text": None},
    {"coding": [{"system": "http://snomed.info/sct", "code": "1"}], "text": {"div": "Jane"}},
    {"text": "Jane"},
]


def _bundled_resources() -> list[dict]:
    """Every resource of the bundled FHIR inputs, at any depth (Bundle entries, contained, test cases' inputs)."""
    found: list[dict] = []

    def collect(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("resourceType"), str) and isinstance(node.get("id"), str):
                found.append(node)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for path in sorted(SAMPLE.glob("*.ndjson")):
        for line in path.read_text("utf-8").splitlines():
            collect(json.loads(line))
    for path in sorted(TEST_DATA.rglob("*.json")):
        try:
            collect(json.loads(path.read_text("utf-8")))
        except ValueError:  # a test case of invalid JSON
            continue
    return found


def _places(node, found: list, top: bool = True) -> list:
    """(container, key or index) of every value in a resource but its type and id."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not (top and key in ("resourceType", "id")):
                found.append((node, key))
            _places(value, found, False)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.append((node, index))
            _places(value, found, False)
    return found


def _variant(resource: dict, rng: random.Random) -> dict:
    """A copy of the resource with one to three of its values replaced, removed or given an odd neighbour."""
    copy = orjson.loads(orjson.dumps(resource))
    for _ in range(rng.randint(1, 3)):
        spots = _places(copy, [])
        if not spots:
            break
        parent, key = rng.choice(spots)
        odd = orjson.loads(orjson.dumps(rng.choice(ODD_VALUES)))
        move = rng.randrange(4)
        if move == 0 or not isinstance(parent, dict):
            parent[key] = odd
        elif move == 1:
            del parent[key]
        elif move == 2:
            parent[rng.choice(["display", "text", "reference", "system", "code", "coding", "zzz"])] = odd
        elif isinstance(parent[key], list):
            parent[key].insert(rng.randint(0, len(parent[key])), odd)
        else:
            parent[key] = [parent[key]]
    return copy


def _outcome(pseudonymiser: ResourcePseudonymiser, resource: dict) -> tuple:
    copy = orjson.loads(orjson.dumps(resource))
    try:
        ids = pseudonymiser.pseudonymise(copy)
    except (RecordProblem, TypeError) as error:  # what the batch quarantines
        return type(error).__name__, str(error), pseudonymiser.take_removed()
    return orjson.dumps(copy), ids.resource_id, ids.patient_id, pseudonymiser.take_removed()


@pytest.mark.parametrize(
    "policy",
    [
        PrivacyPolicy(),
        # paths kept through some elements of these types only: their other elements still take the shorter ways
        PrivacyPolicy(
            keep_free_text=(
                "Observation.code.text",
                "Condition.code.coding.display",
                "MedicationRequest.requester.display",
                "Encounter.participant.individual.display",
            )
        ),
    ],
    ids=["default", "kept paths through them"],
)
def test_the_shorter_ways_give_what_the_full_walk_gives(policy):
    keyring = load_keyring()
    walked = ResourcePseudonymiser(Tokeniser(keyring, id_space="s"), policy)
    shortened = ResourcePseudonymiser(Tokeniser(keyring, id_space="s"), policy)
    walked._shortcuts = (None, *(lambda element: False for _ in walked._shortcuts[1:]))  # never taken
    taken: Counter = Counter()

    def counting(shortcut):
        def take(element):
            done = shortcut(element)
            taken[shortcut.__name__, done] += 1
            return done

        return take

    shortened._shortcuts = (None, *(counting(s) for s in shortened._shortcuts[1:]))

    rng = random.Random(20261204)
    resources = _bundled_resources()
    assert len(resources) > 10_000
    differences = []
    for resource in resources + [_variant(r, rng) for r in resources for _ in range(2)]:
        if _outcome(walked, resource) != _outcome(shortened, resource):
            differences.append(resource)
    assert differences[:3] == []
    for name in ("_scrub_plain_reference", "_scrub_plain_coding", "_scrub_plain_concept"):
        assert taken[name, True] > 1000 and taken[name, False] > 10, (name, taken)


def test_the_stage_bench_measures_the_rows_the_batch_encoder_writes():
    """`python -m health_ingest.bench.stage` encodes the rows, and counts the removals, that the batch's own
    encoder does on the same files."""
    import hashlib

    from health_ingest.batch.fhir import FileEncoder
    from health_ingest.bench.stage import BENCH_KEYRING, BENCH_SOURCE, measure
    from health_ingest.formats.ndjson import resource_type_of

    digest, removed, rows = hashlib.sha256(), 0, 0
    with FileEncoder(BENCH_KEYRING, BENCH_SOURCE, workers=1) as encoder:
        files = sorted(path for path in SAMPLE.glob("*.ndjson") if resource_type_of(path))
        for file_no, path in enumerate(files):
            for chunk in encoder.encode(path, file_no, resource_type_of(path)):
                digest.update(chunk.data)
                removed += sum(chunk.removed.values())
                rows += chunk.rows_read
    measured = measure(SAMPLE)
    assert (measured["resources"], measured["removed"]) == (rows, removed) and rows == 7160 and removed > 20_000
    assert measured["rows digest"] == digest.hexdigest()[:16]
