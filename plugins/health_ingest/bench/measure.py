"""One measured run in a fresh process (so peak RSS belongs to this size alone): the pipeline, then the floor."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

from health_ingest import config
from health_ingest.batch.load import load_delivery
from health_ingest.bench.floor import bare_copy, bare_copy_csv, parse_only
from health_ingest.quality.policy import QualityPolicy
from health_ingest.sources.registry import Source
from health_ingest.warehouse.connection import connect

BENCH_SOURCE = Source(name="bench", kind="fhir", format="ndjson", id_space="bench")
# the bench's rows are the synthetic DCIR sample's, replicated under new DCT_ORD_NUM: its suite failures are
# recorded as warnings, as for the bundled extract (the suites still run, and their time counts)
SNDS_SOURCE = Source(
    name="bench_snds",
    kind="claims",
    format="snds",
    id_space="bench_snds",
    quality=QualityPolicy(downgrade=("conformance", "plausibility")),
)


class BackendMemory(threading.Thread):
    """Samples the RSS of the PostgreSQL backend serving the pipeline's connection (a local server only)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        conn = connect(self.url)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not self.stopped.wait(0.2):
                cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'health-ingest'")
                for (pid,) in cur.fetchall():
                    with contextlib.suppress(psutil.Error):
                        self.peak = max(self.peak, psutil.Process(pid).memory_info().rss)
        conn.close()


STRICT_SOURCE = dataclasses.replace(BENCH_SOURCE, quality=QualityPolicy(strict=True))


def measure(url: str, dataset: Path, *, strict: bool = False) -> dict:
    """The FHIR batch path, then this machine's floor on the same records. `strict`: with strict validation."""
    result, wall, peaks = _run_batch(url, STRICT_SOURCE if strict else BENCH_SOURCE, dataset)
    parsed, parse_seconds = parse_only(dataset)
    conn = connect(url)
    copied, copy_seconds = bare_copy(conn, dataset)
    conn.close()
    return {
        "resources": result.rows_read,
        "loaded": result.rows_loaded,
        "quarantined": result.rows_quarantined,
        "end_to_end_seconds": wall,
        "steps_seconds": vars(result.times),
        "floor": {
            "bare_copy_seconds": copy_seconds,
            "bare_copy_rows": copied,
            "orjson_parse_seconds": parse_seconds,
            "orjson_parse_rows": parsed,
        },
        "peak_rss_bytes": peaks,
    }


def measure_claims(url: str, dataset: Path) -> dict:
    """The SNDS claims path end to end (read, pseudonymise, stage, type, merge, commit), then this machine's floor
    on the same files."""
    from health_ingest.formats.claims import load_profile

    result, wall, peaks = _run_batch(url, SNDS_SOURCE, dataset)
    conn = connect(url)
    copied, copy_seconds = bare_copy_csv(conn, dataset, load_profile(SNDS_SOURCE.format).delimiter)
    conn.close()
    return {
        "rows": result.rows_read,
        "loaded": result.rows_loaded,
        "quarantined": result.rows_quarantined,
        "end_to_end_seconds": wall,
        "steps_seconds": vars(result.times),
        "floor": {"bare_copy_seconds": copy_seconds, "bare_copy_rows": copied},
        "peak_rss_bytes": peaks,
    }


def _run_batch(url: str, source: Source, dataset: Path) -> tuple:
    """One timed batch, with the peak memory of this process and of the backend; its landing copy removed."""
    sampler = BackendMemory(url)
    sampler.start()
    started = time.perf_counter()
    result = load_delivery(source, dataset, url=url).result
    wall = time.perf_counter() - started
    sampler.stopped.set()
    sampler.join()
    shutil.rmtree(config.state_dir() / "landing" / source.name / result.batch_id, ignore_errors=True)
    peaks = {
        "pipeline": peak_rss_bytes(),
        "postgresql_backend": sampler.peak,
    }
    return result, wall, peaks


def peak_rss_bytes() -> int:
    """This process's own peak RSS. Linux's `ru_maxrss` also counts the parent's memory at the moment this
    process was started (it survives `exec`), so the report's dataset building showed in it; `VmHWM` does not."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m health_ingest.bench.measure")
    parser.add_argument("--url", required=True)
    parser.add_argument("--dataset", required=True, type=Path)
    parser.add_argument("--claims", action="store_true", help="the dataset is an SNDS extract")
    parser.add_argument("--strict", action="store_true", help="FHIR with strict validation")
    args = parser.parse_args()
    if args.claims:
        json.dump(measure_claims(args.url, args.dataset), sys.stdout)
    else:
        json.dump(measure(args.url, args.dataset, strict=args.strict), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
