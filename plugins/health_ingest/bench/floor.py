"""The machine's floor on the same records: orjson parsing alone, a bare COPY of raw NDJSON lines into jsonb, and a
bare COPY of the claims CSV files into text columns."""

from __future__ import annotations

import csv
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


def bare_copy_csv(conn, folder: Path, delimiter: str) -> tuple[int, float]:
    """Each CSV file of the folder into a table of text columns named by its header, by PostgreSQL's own CSV
    reader: what loading the claims costs with no pseudonymising, typing, keys or checks."""
    paths = sorted(folder.glob("*.csv"))
    count = 0
    with conn.cursor() as cur:
        for number, path in enumerate(paths):
            with path.open(encoding="utf-8", newline="") as handle:
                header = next(csv.reader(handle, delimiter=delimiter))
            columns = ", ".join(f"c{i} text" for i in range(len(header)))
            cur.execute(f"DROP TABLE IF EXISTS bench_floor_{number}")
            cur.execute(f"CREATE TABLE bench_floor_{number} ({columns})")
        conn.commit()
        started = time.perf_counter()
        for number, path in enumerate(paths):
            with path.open("rb") as handle:
                cur.copy_expert(
                    f"COPY bench_floor_{number} FROM STDIN WITH (FORMAT csv, HEADER true, DELIMITER '{delimiter}')",
                    handle,
                    size=1 << 18,
                )
                count += cur.rowcount
        conn.commit()
        elapsed = time.perf_counter() - started
        for number in range(len(paths)):
            cur.execute(f"DROP TABLE bench_floor_{number}")
        conn.commit()
    return count, elapsed
