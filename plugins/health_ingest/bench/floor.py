"""The machine's floor on the same records: orjson parsing alone, and a bare COPY of raw lines into jsonb."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from health_ingest.formats.ndjson import read_lines, resource_type_of

# CSV with a quote and a delimiter that never occur in NDJSON: PostgreSQL takes each raw line as it is.
RAW_LINES_COPY = "COPY bench_floor (resource) FROM STDIN WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')"


def ndjson_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.ndjson") if resource_type_of(p))


def parse_only(folder: Path) -> tuple[int, float]:
    started = time.perf_counter()
    count = 0
    loads = orjson.loads
    for path in ndjson_files(folder):
        for _, raw in read_lines(path):
            loads(raw)
            count += 1
    return count, time.perf_counter() - started


def bare_copy(conn, folder: Path) -> tuple[int, float]:
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS bench_floor")
        cur.execute("CREATE TABLE bench_floor (resource jsonb NOT NULL)")
        conn.commit()
        started = time.perf_counter()
        for path in ndjson_files(folder):
            with path.open("rb") as handle:
                cur.copy_expert(RAW_LINES_COPY, handle, size=1 << 18)
        conn.commit()
        elapsed = time.perf_counter() - started
        cur.execute("SELECT count(*) FROM bench_floor")
        (count,) = cur.fetchone()
        cur.execute("DROP TABLE bench_floor")
        conn.commit()
    return count, elapsed
