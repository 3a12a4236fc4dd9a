"""FHIR NDJSON files: which resource type a file holds, and its lines, streamed with their numbers."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson

from health_ingest.config import ReadLimits, read_limits
from health_ingest.formats.bounded import TOO_LONG, bounded_lines, open_limited
from health_ingest.formats.resource_types import RESOURCE_TYPES

NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")
TYPE_LOOKAHEAD = 1000  # lines read for a file's first record, past blank and unreadable ones


def is_ndjson(path: Path) -> bool:
    return path.name.lower().endswith(NDJSON_SUFFIXES)


def resource_type_of(path: Path) -> str | None:
    """The resource type a Bulk Data file is named after (`Patient.000.ndjson`, `1.Patient.ndjson`, ...)."""
    stem = path.name
    for suffix in NDJSON_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    for part in stem.replace("_", ".").replace("-", ".").split("."):
        if part in RESOURCE_TYPES:
            return part
    return None


def resource_type_in(path: Path) -> str | None:
    """The resource type of a file's first record: servers name their files anyhow (`Patient1.ndjson`,
    `1.Patient.ndjson`, `patient_0.ndjson.gz`, a hash), so the records say what a file holds. Blank and unreadable
    lines before it are passed (the batch quarantines them); the other lines are checked against it as they are
    read. A file without such a record is of the type its name gives (its unreadable lines are quarantined under
    it), else of none (an export's log, say)."""
    try:
        for number, raw in read_lines(path):
            if number > TYPE_LOOKAHEAD:
                break
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            found = record.get("resourceType") if isinstance(record, dict) else None
            if isinstance(found, str) and found in RESOURCE_TYPES:
                return found
    except (OSError, EOFError, zlib.error):  # a damaged compressed file: the batch says so when it reads it
        pass
    return resource_type_of(path)


def read_lines(path: Path, label: str | None = None, limits: ReadLimits | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw bytes) for every non-blank line; gzip files are read as they stream, within the
    read limits (`label` names the file in a refusal). A line over the length limit is given as `TOO_LONG` (empty),
    which the checks quarantine, without ever being held."""
    limits = limits or read_limits()
    with open_limited(path, label or "a delivered file", limits) as handle:
        for line_number, raw in enumerate(bounded_lines(handle, limits.line_bytes), start=1):
            if raw is TOO_LONG or raw.strip():
                yield line_number, raw
