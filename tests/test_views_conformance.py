"""The official SQL-on-FHIR v2 conformance suite, file by file: every shareable test must pass."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from health_ingest.views.runner import ViewDefinitionError, ViewRunner

SUITE = Path(__file__).resolve().parent / "data" / "sql-on-fhir-v2" / "tests"
CASES = [
    pytest.param(path.name, index, id=f"{path.stem}[{index}] {test['title']}")
    for path in sorted(SUITE.glob("*.json"))
    for index, test in enumerate(json.loads(path.read_text())["tests"])
]


def _run(file_name: str, index: int) -> tuple[bool, str]:
    suite = json.loads((SUITE / file_name).read_text())
    test = suite["tests"][index]
    try:
        runner = ViewRunner(test["view"])
        rows = list(runner.run(suite["resources"]))
    except ViewDefinitionError as error:
        return "expectError" in test, f"error: {error}"
    if "expectError" in test:
        return False, f"expected an error, got {len(rows)} rows"
    if "expectColumns" in test and [c["name"] for c in runner.columns] != test["expectColumns"]:
        return False, f"columns {[c['name'] for c in runner.columns]}"
    canonical = Counter(json.dumps(r, sort_keys=True) for r in rows)
    expected = Counter(json.dumps(r, sort_keys=True) for r in test["expect"])
    return canonical == expected, f"got {sorted(canonical)[:3]}, expected {sorted(expected)[:3]}"


@pytest.mark.parametrize(("file_name", "index"), CASES)
def test_conformance_case(file_name, index):
    test = json.loads((SUITE / file_name).read_text())["tests"][index]
    passed, detail = _run(file_name, index)
    if not passed and "shareable" not in test.get("tags", []):
        pytest.xfail(f"experimental test, reported, not required: {detail}")
    assert passed, detail


def test_conformance_summary(capsys):
    """Per-file pass counts, printed for the record; the 123 shareable tests must all pass."""
    per_file: dict[str, list[int]] = {}
    shareable_failures = []
    for path in sorted(SUITE.glob("*.json")):
        for index, test in enumerate(json.loads(path.read_text())["tests"]):
            passed, _ = _run(path.name, index)
            counts = per_file.setdefault(path.name, [0, 0])
            counts[0] += passed
            counts[1] += 1
            if not passed and "shareable" in test.get("tags", []):
                shareable_failures.append(f"{path.name}: {test['title']}")
    with capsys.disabled():
        print("\nSQL-on-FHIR v2 conformance, passed/total per file:")
        for name, (passed, total) in per_file.items():
            print(f"  {name:28} {passed:3}/{total}")
    assert sum(t for _, t in per_file.values()) == 134
    assert shareable_failures == []
