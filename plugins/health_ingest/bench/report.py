"""Drive the benchmark and report it: a table for people, JSON for machines (`BENCH_OUT`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from health_ingest import config
from health_ingest.bench.datasets import build_fhir_dataset, build_snds_dataset
from health_ingest.report import table

FULL_SIZES = (100_000, 1_000_000)
QUICK_SIZES = (20_000,)
STEPS = ("land", "read", "check", "pseudonymise", "stage", "verify", "commit")
# the claims path's stages, each timed where it runs (they run at once, a chunk apart)
CLAIMS_STAGES = (
    ("pseudonymise", "read, pseudonymise, encode (rows/s per worker)"),
    ("stage", "stage, COPY (rows/s of its thread)"),
    ("check", "type the other rows, on its own connection (rows/s)"),
    ("commit", "merge into the warehouse (rows/s)"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m health_ingest.bench")
    parser.add_argument("--quick", action="store_true", help="one small size, for CI")
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT", "bench-results.json"))
    parser.add_argument("--render", metavar="FILE", help="print the table of an earlier run's JSON and stop")
    parser.add_argument(
        "--ingestion-view-only", action="store_true", help="only the Ingestion view's queries on 100,000 batches"
    )
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    os.environ.setdefault(config.ENV_DEMO, "1")  # the benchmark's pseudonyms use the demo key

    started = time.perf_counter()
    admin_url = _server()
    if args.ingestion_view_only:
        view = _measure_ingestion_view(admin_url)
        print(render_ingestion_view(view))
        return 0
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    bench = config.project_root() / ".bench"
    runs = []
    for size in sizes:
        print(f"[bench] dataset of {size:,} resources in {bench / f'fhir-{size}'}", flush=True)
        build_fhir_dataset(config.project_root() / "samples" / "smart-bulk-10", bench / f"fhir-{size}", size)
        print(f"[bench] running the batch path and the floor on {size:,} resources", flush=True)
        runs.append({"target": size, **_measure_in(admin_url, f"bench_{size}", bench / f"fhir-{size}")})
    # strict validation beside the default, on the first size (its FHIRPath invariants make it far slower)
    size = runs[0]["target"]
    print(f"[bench] running the batch path with strict validation on {size:,} resources", flush=True)
    strict_run = {"target": size, **_measure_in(admin_url, f"bench_strict_{size}", bench / f"fhir-{size}", "--strict")}

    claims_runs = []
    for size in sizes:
        print(f"[bench] SNDS dataset of {size:,} rows in {bench / f'snds-{size}'}", flush=True)
        build_snds_dataset(config.project_root() / "samples" / "snds-dcir", bench / f"snds-{size}", size)
        run = _measure_in(admin_url, f"bench_snds_{size}", bench / f"snds-{size}", "--claims")
        run["rows_per_second"] = round(run["rows"] / run["end_to_end_seconds"])
        floor = run["floor"]
        run["floor_rows_per_second"] = round(floor["bare_copy_rows"] / floor["bare_copy_seconds"])
        run["ratio_to_floor"] = run["rows_per_second"] / run["floor_rows_per_second"]
        claims_runs.append({"target": size, **run})

    view = _measure_ingestion_view(admin_url)

    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "postgresql": _server_version(admin_url),
        "runs": [_with_rates(run) for run in runs],
        "strict_run": _with_rates(strict_run),
        "snds_runs": claims_runs,
        "ingestion_view": view,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(render(results))
    print(f"\nwrote {args.out}")
    return 0


def render(results: dict) -> str:
    runs = results["runs"]
    headers = ["", *(f"{run['resources']:,} resources" for run in runs)]
    rows = [[f"{step} (resources/s)", *(_step_rate(run, step) for run in runs)] for step in STEPS]
    rows += [
        ["end to end (resources/s)", *(run["rates"]["end_to_end"] for run in runs)],
        ["floor: bare COPY into jsonb (rows/s)", *(run["rates"]["floor_copy"] for run in runs)],
        ["floor: orjson parse alone (rows/s)", *(run["rates"]["floor_parse"] for run in runs)],
        ["end to end / bare COPY", *(f"{run['ratio_to_floor']:.2f}" for run in runs)],
        [
            "quality suites (beside the merges), share",
            *(f"{100 * run['steps_seconds'].get('suites', 0) / run['end_to_end_seconds']:.1f} %" for run in runs),
        ],
        [
            "batch waiting for the suites, share",
            *(
                f"{100 * run['steps_seconds'].get('suites_waited', 0) / run['end_to_end_seconds']:.1f} %"
                for run in runs
            ),
        ],
        ["end to end (s)", *(f"{run['end_to_end_seconds']:.1f}" for run in runs)],
        ["peak RSS pipeline (MiB)", *(run["peak_rss_bytes"]["pipeline"] >> 20 for run in runs)],
        ["peak RSS PostgreSQL backend (MiB)", *(run["peak_rss_bytes"]["postgresql_backend"] >> 20 for run in runs)],
    ]
    title = f"FHIR batch path, {results['machine']['cpus']} cores, {results['postgresql']}"
    text = f"\n{title}\n\n" + table(headers, rows, right=set(range(1, len(headers))))
    strict = results.get("strict_run")
    default = next((run for run in runs if strict and run["resources"] == strict["resources"]), None)
    if strict and default:
        text += f"\n\nStrict validation beside the default, {strict['resources']:,} resources\n\n"
        text += table(["", "default", "strict"], _strict_rows(default, strict), right={1, 2})
    claims = results.get("snds_runs") or []
    if claims:
        claims_headers = ["", *(f"{run['rows']:,} rows" for run in claims)]
        claims_rows = [
            *(
                [label, *(_rate(run["rows"], run["steps_seconds"].get(step, 0)) for run in claims)]
                for step, label in CLAIMS_STAGES
            ),
            ["SNDS end to end (rows/s)", *(run["rows_per_second"] for run in claims)],
            ["floor: bare COPY of the CSV into text (rows/s)", *(run.get("floor_rows_per_second") for run in claims)],
            ["end to end / bare COPY", *(_ratio(run) for run in claims)],
            ["end to end (s)", *(f"{run['end_to_end_seconds']:.1f}" for run in claims)],
            [
                "quality suites, counted chunk by chunk, share",
                *(f"{100 * run['steps_seconds'].get('suites', 0) / run['end_to_end_seconds']:.1f} %" for run in claims),
            ],
            [
                "batch waiting for the suites once merged, share",
                *(
                    f"{100 * run['steps_seconds'].get('suites_waited', 0) / run['end_to_end_seconds']:.1f} %"
                    for run in claims
                ),
            ],
            ["peak RSS pipeline (MiB)", *(run["peak_rss_bytes"]["pipeline"] >> 20 for run in claims)],
            [
                "peak RSS PostgreSQL backend (MiB)",
                *(run["peak_rss_bytes"]["postgresql_backend"] >> 20 for run in claims),
            ],
        ]
        text += "\n\nSNDS claims path (DCIR ER_PRS_F + ER_PHA_F)\n\n"
        text += table(claims_headers, claims_rows, right=set(range(1, len(claims_headers))))
    if results.get("ingestion_view"):
        text += "\n\n" + render_ingestion_view(results["ingestion_view"])
    return text


def render_ingestion_view(view: dict) -> str:
    rows = [
        [label, view[key]["median"], view[key]["max"]]
        for key, label in (
            ("overview_ms", "overview: sources' last batches, 30 days per day"),
            ("batch_page_ms", "batch page: batch, files, quarantine by reason, quality, privacy"),
            ("batches_list_ms", "batches list: newest 50"),
            ("consumers_feed_ms", "consumers feed: newest 100 committed, tables written"),
        )
    ]
    title = f"Ingestion view queries on {view['batches']:,} batches since {view['oldest'][:10]} (ms)"
    return f"{title}\n\n" + table(["", "median", "slowest"], rows, right={1, 2})


# --- implementation details -------------------------------------------------------------------


def _strict_rows(default: dict, strict: dict) -> list[list]:
    """What strict validation costs: the workers' check time per resource (it runs there), and end to end."""

    def per_resource(run: dict) -> str:
        return f"{1e6 * run['steps_seconds']['check'] / run['resources']:,.0f}"

    return [
        ["check in the workers (µs of a worker per resource)", per_resource(default), per_resource(strict)],
        ["end to end (resources/s)", default["rates"]["end_to_end"], strict["rates"]["end_to_end"]],
        ["quarantined", default["quarantined"], strict["quarantined"]],
        ["end to end (s)", f"{default['end_to_end_seconds']:.1f}", f"{strict['end_to_end_seconds']:.1f}"],
    ]


def _step_rate(run: dict, step: str) -> int | str | None:
    """A step's rate; a step that took under 10 ms is said so (its rate would be a meaningless large number)."""
    seconds = run["steps_seconds"][step]
    return "under 10 ms" if 0 <= seconds < 0.01 else run["rates"][step]


def _ratio(run: dict) -> str | None:
    ratio = run.get("ratio_to_floor")  # results written before the claims floor was measured have none
    return f"{ratio:.2f}" if ratio is not None else None


def _rate(rows: int, seconds: float) -> int | None:
    return round(rows / seconds) if seconds > 0 else None


def _measure_ingestion_view(admin_url: str, batches: int = 100_000) -> dict:
    """The Ingestion view's queries on a warehouse of ten years of batches (built with SQL, no batch run)."""
    from health_ingest.bench.ingestion_view import fill_warehouse, measure_queries
    from health_ingest.warehouse.connection import connect

    print(f"[bench] Ingestion view: a warehouse of {batches:,} batches over ten years", flush=True)
    url = _fresh_database(admin_url, "bench_ingestion_view")
    conn = connect(url)
    fill_warehouse(conn, batches=batches)
    conn.close()
    _quiet(admin_url)
    try:
        return measure_queries(url)
    finally:
        _drop_database(admin_url, "bench_ingestion_view")


def _measure(url: str, dataset: Path, *options: str) -> dict:
    """One measured run in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, "-m", "health_ingest.bench.measure", *options, "--url", url, "--dataset", str(dataset)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def _with_rates(run: dict) -> dict:
    n = run["resources"]
    steps = run["steps_seconds"]
    floor = run["floor"]
    rates = {step: round(n / steps[step]) if steps[step] > 0 else None for step in STEPS}
    rates["end_to_end"] = round(n / run["end_to_end_seconds"])
    rates["floor_copy"] = round(floor["bare_copy_rows"] / floor["bare_copy_seconds"])
    rates["floor_parse"] = round(floor["orjson_parse_rows"] / floor["orjson_parse_seconds"])
    return {**run, "rates": rates, "ratio_to_floor": rates["end_to_end"] / rates["floor_copy"]}


def _server() -> str:
    url = os.environ.get(config.ENV_BENCH_DATABASE_URL)
    if url:
        return url
    from health_ingest.warehouse.embedded import start_embedded_warehouse

    return start_embedded_warehouse(config.state_dir() / "bench-pg", database="postgres")


def _measure_in(admin_url: str, database: str, dataset: Path, *flags: str) -> dict:
    """One measured run in a database of its own, dropped afterwards."""
    url = _fresh_database(admin_url, database)
    try:
        return _measure(url, dataset, *flags)
    finally:
        _drop_database(admin_url, database)


def _fresh_database(admin_url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    from health_ingest.warehouse.connection import connect
    from health_ingest.warehouse.migrations import migrate

    _drop_database(admin_url, name)
    admin = connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    conn = connect(url)
    migrate(conn)
    conn.close()
    _quiet(admin_url)
    return url


def _drop_database(admin_url: str, name: str) -> None:
    """A measured database goes once measured: its autovacuum would otherwise run during the next run."""
    from health_ingest.warehouse.connection import connect

    admin = connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def _quiet(admin_url: str) -> None:
    """Each run starts from a quiet server: the pages the previous run dirtied are written out first, so that
    one run's checkpoint and write-back do not land in the next run's time."""
    import psycopg2

    from health_ingest.warehouse.connection import connect

    admin = connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("CHECKPOINT")
    except psycopg2.Error:  # a role without the right to: the run is measured as the server is
        pass
    finally:
        admin.close()
    os.sync()


def _server_version(url: str) -> str:
    from health_ingest.warehouse.connection import connect

    conn = connect(url)
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        (version,) = cur.fetchone()
    conn.close()
    return f"PostgreSQL {version.split()[0]}"
