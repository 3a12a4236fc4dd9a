"""`health-ingest demo`: the embedded warehouse, migrations, Airflow metadata, and one real DAG run on the bundled
sample, then what it loaded."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from health_ingest import config

DEMO_SOURCE = "smart_sample"
DEMO_SAMPLE = Path("samples") / "smart-bulk-10"
BATCH_QUALITY = """
    SELECT step_seconds, (step_seconds->>'elapsed')::float,
           (SELECT count(*) FILTER (WHERE NOT success) FROM ingest.dq_results WHERE batch_id = b.batch_id),
           (SELECT count(*) FROM ingest.dq_results WHERE batch_id = b.batch_id)
    FROM ingest.batches b WHERE batch_id = %s
"""


def add_commands(commands) -> None:
    demo = commands.add_parser("demo", help="run the FHIR DAG end to end on the bundled sample")
    demo.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded warehouse (unless one is configured), migrations, Airflow metadata, and one real DAG run."""
    from health_ingest.airflow.environment import airflow_environment
    from health_ingest.sources.registry import get_source
    from health_ingest.warehouse import batches
    from health_ingest.warehouse.connection import configured_warehouse_url, connect, warehouse_origin, warehouse_url
    from health_ingest.warehouse.migrations import migrate

    os.environ[config.ENV_DEMO] = "1"
    started = time.monotonic()
    configured = configured_warehouse_url() is not None
    _say("warehouse", f"using {warehouse_origin()}" if configured else "starting the embedded PostgreSQL")
    url = warehouse_url()
    conn = connect(url)
    try:
        applied = migrate(conn)
        _say("warehouse", f"migrations applied: {len(applied)} new")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT now()")
            (run_started,) = cur.fetchone()
    finally:
        conn.close()

    source = get_source(DEMO_SOURCE)
    sample = _demo_delivery(source)
    env = {**os.environ, **airflow_environment(), config.ENV_WAREHOUSE_URL: url, config.ENV_DEMO: "1"}
    airflow = str(Path(sys.executable).with_name("airflow"))
    airflow_log = config.state_dir() / "demo-airflow.log"
    _say("airflow", f"initialising metadata (SQLite) and running DAG {source.dag_id}; log: {airflow_log}")
    with airflow_log.open("w") as log_file:
        for command in (
            [airflow, "db", "migrate"],
            [airflow, "dags", "test", source.dag_id, "--conf", f'{{"delivery_path": "{sample}"}}'],
        ):
            code = subprocess.run(command, env=env, stdout=log_file, stderr=subprocess.STDOUT).returncode
            if code != 0:
                log_file.flush()
                print(_tail(airflow_log, 40), file=sys.stderr)
                print(
                    f"error: '{' '.join(command[1:3])}' exited {code}; full log: {airflow_log}",
                    file=sys.stderr,
                )
                return 1

    conn = connect(url)
    conn.autocommit = True
    try:
        demo_batches = [
            b for b in batches.recent_batches(conn, limit=5, source=source.name) if b.started_at >= run_started
        ]
        if not demo_batches or demo_batches[0].status != "committed":
            error = demo_batches[0].error if demo_batches else "no batch was recorded"
            print(f"error: the demo batch did not commit: {error}; log: {airflow_log}", file=sys.stderr)
            return 1
        batch = demo_batches[0]
        counts = batches.counts_by_type(conn, batch.batch_id)
        with conn.cursor() as cur:
            cur.execute(BATCH_QUALITY, (batch.batch_id,))
            quality = cur.fetchone()
    finally:
        conn.close()
    _print_demo_summary(batch, counts, url, time.monotonic() - started, configured, quality)
    return 0


# --- implementation details -------------------------------------------------------------------


def _say(step: str, message: str) -> None:
    print(f"[{step}] {message}", flush=True)


def _tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _print_demo_summary(batch, counts, url: str, elapsed: float, configured: bool, quality) -> None:
    from health_ingest.report import batch_counts_table
    from health_ingest.warehouse.connection import redact

    print()
    print(f"Demo batch {batch.batch_id} ({batch.status}, pseudonymisation key {batch.key_id})")
    print()
    print(batch_counts_table(counts))
    print()
    step_seconds, batch_seconds, failed_expectations, expectations = quality
    suites = (step_seconds or {}).get("suites", 0.0)
    waited = (step_seconds or {}).get("suites_waited", suites)
    share = 100 * waited / float(batch_seconds) if batch_seconds else 0.0
    print(
        f"Quality suites: {expectations} expectations, {failed_expectations} not met (warnings only); "
        f"{suites:.2f} s on their own connection beside the merges, of which the {float(batch_seconds):.2f} s "
        f"batch waited {waited:.2f} s ({share:.0f} %)"
    )
    if batch.dq_report:
        print(f"Data Docs: {batch.dq_report}")
    print(f"Elapsed (install check, Airflow start, DAG run): {elapsed:.1f} s")
    print(f"Warehouse: {redact(url)}")
    if configured:
        psql = "psql"
    else:
        from health_ingest.warehouse.embedded import psql_path

        psql = str(psql_path())
    shown = redact(url)
    print("Query it, for example:")
    print(f"  {psql} '{shown}' -c \"SELECT resource_type, rows_read, rows_loaded, rows_quarantined")
    print(f"    FROM ingest.batch_files WHERE batch_id = '{batch.batch_id}'\"")
    print(f"  {psql} '{shown}' -c \"SELECT resource->>'gender', resource->>'birthDate' FROM fhir.patient\"")
    print("  health-ingest warehouse status")


def _demo_delivery(source) -> Path:
    """The bundled sample delivered into the demo source's inbox (linked, not copied): `delivery_path` names only
    folders inside a source's allowed roots."""
    import os
    import shutil
    import time

    sample = (config.project_root() / DEMO_SAMPLE).resolve()
    delivery = source.inbox / time.strftime("export-%Y%m%dT%H%M%S")

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(sample, delivery, copy_function=link_or_copy, dirs_exist_ok=True)
    return delivery
