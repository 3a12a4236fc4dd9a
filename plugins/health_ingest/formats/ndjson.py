"""FHIR NDJSON files: which resource type a file holds, and its lines, streamed with their numbers."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

from health_ingest.formats.resource_types import RESOURCE_TYPES

NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")


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


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw bytes) for every non-blank line; gzip files are read as they stream."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield line_number, raw
