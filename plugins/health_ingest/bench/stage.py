"""The FHIR workers' stages alone, in this process: their encoder (check, pseudonymise, encode the rows) over a
dataset's files, a chunk at a time as the workers read them, with the steps' own timers reading this process's CPU
time, so that what else runs on the machine counts for less than in `make bench`'s wall-clock figures. It prints the
steps' rates as `make bench` computes them, and a digest of the rows and the removal counts made under a fixed key,
which two versions whose output is the same share.

    python -m health_ingest.bench.stage [DATASET]    (default: `make bench`'s 100k dataset, built if missing)

Two versions are compared by running this file of the newer with each version's `plugins` folder on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from unittest import mock

from health_ingest import config
from health_ingest.batch import fhir
from health_ingest.bench.datasets import build_fhir_dataset
from health_ingest.formats.ndjson import resource_type_of
from health_ingest.formats.numbers import inexact_lines
from health_ingest.privacy.keyring import Keyring, MasterKey
from health_ingest.sources.registry import Source

# a fixed key, published here, so that two runs make the same tokens: never one for real data
BENCH_KEYRING = Keyring(keys={"bench": MasterKey("bench", bytes(range(32)), demo=True)}, active_id="bench")
BENCH_SOURCE = Source(name="bench", kind="fhir", format="ndjson", id_space="bench")


def measure(dataset: Path) -> dict:
    encoder = fhir.chunk_encoder(BENCH_KEYRING, BENCH_SOURCE)
    chunks = list(_chunks(dataset))  # read before the clock starts, as the workers' reading is not a step
    rows = check = pseudonymise = 0.0
    digest, removed = hashlib.sha256(), Counter()
    started = time.process_time()
    with mock.patch("time.perf_counter", time.process_time):
        for file_no, resource_type, lines, inexact in chunks:
            chunk = encoder.encode(file_no, resource_type, lines, inexact)
            rows += chunk.rows_read
            check += chunk.check_seconds
            pseudonymise += chunk.pseudonymise_seconds
            digest.update(chunk.data)
            removed.update(chunk.removed)
    cpu = time.process_time() - started
    return {
        "resources": int(rows),
        "check (resources/s)": round(rows / check),
        "pseudonymise (resources/s)": round(rows / pseudonymise),
        "encoder, all of it (resources/s)": round(rows / cpu),
        "rows digest": digest.hexdigest()[:16],
        "removed": sum(removed.values()),
    }


def _chunks(dataset: Path):
    """(file number, resource type, lines, lines to parse exactly) in the workers' chunks of whole lines."""
    files = sorted(path for path in dataset.glob("*.ndjson") if resource_type_of(path))
    for file_no, path in enumerate(files):
        data, start, first_line = path.read_bytes(), 0, 1
        while start < len(data):
            end = data.find(b"\n", min(start + fhir.CHUNK_BYTES, len(data)) - 1) + 1 or len(data)
            piece = data[start:end]
            lines = [(n, raw) for n, raw in enumerate(piece.split(b"\n"), start=first_line) if raw.strip()]
            inexact = inexact_lines(piece, first_line)
            yield file_no, resource_type_of(path), lines, inexact
            first_line += piece.count(b"\n")
            start = end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m health_ingest.bench.stage")
    parser.add_argument("dataset", nargs="?", type=Path, help="a folder of NDJSON files, one per resource type")
    args = parser.parse_args(argv)
    dataset = args.dataset
    if dataset is None:
        dataset = config.project_root() / ".bench" / "fhir-100000"
        build_fhir_dataset(config.project_root() / "samples" / "smart-bulk-10", dataset, 100_000)
    print(json.dumps(measure(dataset)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
