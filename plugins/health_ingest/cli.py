"""The `health-ingest` command: the demo, one-off ingestion, the warehouse and the keys."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from health_ingest import config
from health_ingest.errors import HealthIngestError

log = logging.getLogger("health_ingest")

DEMO_SOURCE = "smart_sample"
DEMO_SAMPLE = Path("samples") / "smart-bulk-10"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except HealthIngestError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded warehouse (unless one is configured), migrations, Airflow metadata, and one real DAG run."""
    from health_ingest.airflow_env import airflow_environment
    from health_ingest.sources.registry import get_source
    from health_ingest.warehouse import batches
    from health_ingest.warehouse.connection import connect, warehouse_url
    from health_ingest.warehouse.migrations import migrate

    os.environ[config.ENV_DEMO] = "1"
    started = time.monotonic()
    configured = bool(os.environ.get(config.ENV_WAREHOUSE_URL))
    _say(
        "warehouse",
        "starting the embedded PostgreSQL" if not configured else "using HEALTH_INGEST_WAREHOUSE_URL",
    )
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
    sample = (config.project_root() / DEMO_SAMPLE).resolve()
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
            cur.execute(
                "SELECT step_seconds, (step_seconds->>'elapsed')::float, "
                "(SELECT count(*) FILTER (WHERE NOT success) FROM ingest.dq_results WHERE batch_id = b.batch_id), "
                "(SELECT count(*) FROM ingest.dq_results WHERE batch_id = b.batch_id) "
                "FROM ingest.batches b WHERE batch_id = %s",
                (batch.batch_id,),
            )
            quality = cur.fetchone()
    finally:
        conn.close()
    _print_demo_summary(batch, counts, url, time.monotonic() - started, configured, quality)
    return 0


def cmd_ingest_fhir(args: argparse.Namespace) -> int:
    """One batch without Airflow: the same code the DAG task calls."""
    from health_ingest.pipeline import run_fhir_batch
    from health_ingest.report import batch_counts_table
    from health_ingest.sources.registry import get_source

    source = get_source(args.source)
    progress = None if args.quiet else _progress_printer()
    result = run_fhir_batch(Path(args.path), source, progress=progress)
    counts = [(t, c.rows_read, c.rows_loaded, c.rows_quarantined) for t, c in sorted(result.counts.items())]
    print(batch_counts_table(counts))
    print(f"\nbatch {result.batch_id} committed in {result.elapsed:.1f} s (key {result.key_id})")
    for name in result.skipped_files:
        print(f"skipped {name}: not named after a FHIR resource type")
    return 0


def cmd_pseudonymise(args: argparse.Namespace) -> int:
    """NDJSON in, pseudonymised NDJSON out, streamed; rejected lines are reported on stderr, never echoed."""
    import orjson

    from health_ingest.quality.checks import Rejection, check_line

    pseudonymiser = _filter_pseudonymiser(args)
    written = rejected = 0
    out = sys.stdout.buffer
    for line_no, raw in enumerate(sys.stdin.buffer, start=1):
        if not raw.strip():
            continue
        checked = check_line(raw, None)
        if isinstance(checked, Rejection):
            rejected += 1
            print(f"line {line_no}: {checked.reason}: {checked.message}", file=sys.stderr)
            continue
        pseudonymiser.pseudonymise(checked)
        out.write(orjson.dumps(checked) + b"\n")
        written += 1
    out.flush()
    print(f"{written} resources written, {rejected} lines rejected", file=sys.stderr)
    return 1 if rejected else 0


def _filter_pseudonymiser(args: argparse.Namespace):
    from health_ingest.privacy.resources import ResourcePseudonymiser

    if args.compat == "microsoft":
        from health_ingest.privacy.compat import MicrosoftCompatTokeniser

        key = args.key or os.environ.get("HEALTH_INGEST_COMPAT_KEY")
        if not key:
            raise HealthIngestError("--compat microsoft needs --key KEY (or HEALTH_INGEST_COMPAT_KEY)")
        return ResourcePseudonymiser(MicrosoftCompatTokeniser(key))
    if not args.source:
        raise HealthIngestError("give --source NAME (its id space and privacy policy), or --compat microsoft")
    from health_ingest.encoding import chunk_encoder
    from health_ingest.privacy.keyring import load_keyring
    from health_ingest.sources.registry import get_source

    return chunk_encoder(load_keyring(), get_source(args.source)).pseudonymiser


def cmd_ingest_claims(args: argparse.Namespace) -> int:
    """One claims batch without Airflow: the same code the claims DAG calls."""
    from dataclasses import replace

    from health_ingest.pipeline_claims import run_claims_batch
    from health_ingest.report import batch_counts_table
    from health_ingest.sources.registry import get_source

    source = get_source(args.source)
    if source.kind != "claims":
        raise HealthIngestError(f"source '{source.name}' is a {source.kind} source, not a claims source")
    if args.profile and args.profile != source.format:
        source = replace(source, format=args.profile)
    progress = None if args.quiet else _progress_printer()
    result = run_claims_batch(Path(args.path), source, progress=progress)
    counts = [(t, c.rows_read, c.rows_loaded, c.rows_quarantined) for t, c in sorted(result.counts.items())]
    print(batch_counts_table(counts).replace("resource type", "table        ", 1))
    print(f"\nbatch {result.batch_id} committed in {result.elapsed:.1f} s (key {result.key_id})")
    return 0


def cmd_warehouse_migrate(args: argparse.Namespace) -> int:
    from health_ingest.warehouse.connection import connect, redact, warehouse_url
    from health_ingest.warehouse.migrations import migrate

    url = warehouse_url()
    conn = connect(url)
    try:
        applied = migrate(conn)
    finally:
        conn.close()
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name}")
    print(f"warehouse {redact(url)} is up to date ({len(applied)} applied now)")
    return 0


def cmd_warehouse_status(args: argparse.Namespace) -> int:
    from health_ingest.report import table
    from health_ingest.warehouse import batches
    from health_ingest.warehouse.connection import connect, redact, warehouse_url
    from health_ingest.warehouse.migrations import require_migrated

    url = warehouse_url()
    conn = connect(url)
    conn.autocommit = True
    try:
        require_migrated(conn)
        rows = batches.recent_batches(conn, limit=args.limit, source=args.source)
    finally:
        conn.close()
    print(f"warehouse {redact(url)}: {len(rows)} most recent batches\n")
    print(
        table(
            ["batch", "source", "status", "started (UTC)", "read", "loaded", "quarantined", "key", "error"],
            [
                (
                    b.batch_id,
                    b.source,
                    b.status,
                    b.started_at,
                    b.rows_read,
                    b.rows_loaded,
                    b.rows_quarantined,
                    b.key_id,
                    (b.error or "")[:80],
                )
                for b in rows
            ],
            right={4, 5, 6},
        )
    )
    reports = [(b.batch_id, b.dq_report) for b in rows if b.dq_report]
    if reports:
        print("\nData Docs:")
        for batch_id, report in reports:
            print(f"  {batch_id}  {report}")
    return 0


def cmd_warehouse_rekey(args: argparse.Namespace) -> int:
    from health_ingest.privacy.keyring import load_keyring
    from health_ingest.warehouse.connection import connect, warehouse_url
    from health_ingest.warehouse.migrations import require_migrated
    from health_ingest.warehouse.rekey import rekey_warehouse

    keyring = load_keyring()
    conn = connect(warehouse_url())
    try:
        require_migrated(conn)
        report = rekey_warehouse(conn, keyring, args.to_key or keyring.active_id, progress=print)
    finally:
        conn.close()
    print(f"re-keyed {report.batches} batches: {report.rows} rows, {report.tokens} tokens")
    return 0


def cmd_warehouse_url(args: argparse.Namespace) -> int:
    from health_ingest.warehouse.connection import warehouse_url

    print(warehouse_url())
    return 0


def cmd_quality_docs(args: argparse.Namespace) -> int:
    from health_ingest.quality.docs import publish_data_docs
    from health_ingest.warehouse.connection import connect, warehouse_url

    conn = connect(warehouse_url())
    conn.autocommit = True
    try:
        index = publish_data_docs(conn, args.batch)
    finally:
        conn.close()
    print(index or f"batch {args.batch} has no data-quality results")
    return 0 if index else 1


def cmd_views(args: argparse.Namespace) -> int:
    from health_ingest.views.flat import rebuild, refresh_batch
    from health_ingest.warehouse.connection import connect, warehouse_url
    from health_ingest.warehouse.migrations import require_migrated

    conn = connect(warehouse_url())
    conn.autocommit = True  # each refresh opens its own transaction
    try:
        require_migrated(conn)
        written = refresh_batch(conn, args.batch) if args.batch else rebuild(conn)
    finally:
        conn.close()
    for name, rows in written.items():
        print(f"flat.{name}: {rows:,} rows {'refreshed' if args.batch else 'rebuilt'}")
    return 0


def cmd_retention_purge(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from health_ingest.warehouse.connection import connect, warehouse_url
    from health_ingest.warehouse.migrations import require_migrated
    from health_ingest.warehouse.retention import purge_raw_data, retention_days

    conn = connect(warehouse_url())
    try:
        require_migrated(conn)
        days = args.days if args.days is not None else retention_days()
        report = purge_raw_data(conn, older_than=timedelta(days=days))
    finally:
        conn.close()
    print(
        f"purged {report.landing_folders} landing folders and {report.quarantine_records} quarantine records "
        f"older than {days} days (before {report.cutoff:%Y-%m-%d %H:%M} UTC)"
    )
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from health_ingest.privacy.keyring import new_keyring_file

    path = Path(args.keyring)
    if _refuse_overwrite(path):
        return 2
    keyring = new_keyring_file(path)
    print(f"wrote {path} (mode 0600) with active key {keyring.active_id}; set {config.ENV_KEYRING}={path}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from health_ingest.privacy.keyring import rotate_keyring_file

    keyring = rotate_keyring_file(Path(args.keyring))
    print(f"{args.keyring}: new active key {keyring.active_id}; earlier keys kept: {len(keyring.keys) - 1}")
    print("new batches use it now; 'health-ingest warehouse rekey --to-key ...' re-pseudonymises older ones")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from health_ingest.privacy.keyring import load_keyring, read_keyring_file

    keyring = read_keyring_file(Path(args.keyring)) if args.keyring else load_keyring()
    for key_id, key in sorted(keyring.keys.items()):
        flags = [f for f, on in (("active", key_id == keyring.active_id), ("demo", key.demo)) if on]
        print(f"{key_id}  {len(key.secret) * 8}-bit  {' '.join(flags)}")
    return 0


def cmd_quality_scaffold_claims(args: argparse.Namespace) -> int:
    from health_ingest.quality.claims_suites import scaffold

    written = scaffold(config.project_root() / "expectations", force=args.force)
    for path in written:
        print(f"wrote {path.relative_to(config.project_root())}")
    print(f"{len(written)} suites written; existing ones were kept" if not args.force else f"{len(written)} written")
    return 0


def cmd_keys_jwks(args: argparse.Namespace) -> int:
    """A signing key pair for SMART Backend Services: the private key to a 0600 file, the public JWKS printed."""
    import json

    from health_ingest.sources.bulk.auth import new_signing_key

    path = Path(args.out)
    if _refuse_overwrite(path):
        return 2
    pem, jwks = new_signing_key(args.alg)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    print(json.dumps(jwks, indent=2))
    print(
        f"private key written to {path} (mode 0600): put it in the password of the source's Airflow connection, "
        f'with extra {{"auth": "smart-backend-services", "client_id": ..., "alg": "{args.alg}", '
        f'"kid": "{jwks["keys"][0]["kid"]}"}}; register the JWKS above with the server',
        file=sys.stderr,
    )
    return 0


def cmd_pull_fhir(args: argparse.Namespace) -> int:
    """Pull a FHIR server's export and load it as one batch (or, with --url alone, only download it)."""
    from health_ingest.report import batch_counts_table
    from health_ingest.sources.bulk import pull
    from health_ingest.sources.registry import get_source

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    if not args.source:
        if not args.url:
            print("error: give --source NAME (a declared source) or --url URL (a one-off download)", file=sys.stderr)
            return 2
        folder = pull.download_once(args.url, Path(args.out), progress=progress)
        print(f"export downloaded to {folder} (not loaded: give --source to load it)")
        return 0
    source = get_source(args.source)
    if args.cancel:
        print(pull.cancel_export(source))
        return 0
    export = pull.pull_export(source, full_refresh=args.full_refresh, url=args.url, progress=progress)
    result = pull.load_export(source, export)
    counts = [(t, c.rows_read, c.rows_loaded, c.rows_quarantined) for t, c in sorted(result.counts.items())]
    print(batch_counts_table(counts))
    print(
        f"\nbatch {result.batch_id} committed in {result.elapsed:.1f} s; next export of {source.name} since "
        f"{export.transaction_time}"
    )
    return 0


# --- implementation details -------------------------------------------------------------------


def _refuse_overwrite(path: Path) -> bool:
    """Key files are never overwritten: True (and a message) when one is already there."""
    if path.exists():
        print(f"error: {path} exists; keys are never overwritten", file=sys.stderr)
        return True
    return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="health-ingest", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(title="commands")

    demo = commands.add_parser("demo", help="run the FHIR DAG end to end on the bundled sample")
    demo.set_defaults(run=cmd_demo)

    ingest = commands.add_parser("ingest", help="load one delivery as one batch, without Airflow")
    ingest_kinds = ingest.add_subparsers(title="kinds")
    fhir = ingest_kinds.add_parser("fhir", help="a folder of FHIR NDJSON files, or one file")
    fhir.add_argument("path")
    fhir.add_argument("--source", required=True, help="a source name from the sources file")
    fhir.add_argument("--quiet", action="store_true", help="no progress lines")
    fhir.set_defaults(run=cmd_ingest_fhir)
    claims = ingest_kinds.add_parser("claims", help="a folder of claims files (CSV, pipe-delimited, gzip, zip)")
    claims.add_argument("path")
    claims.add_argument("--source", required=True, help="a claims source from the sources file")
    claims.add_argument("--profile", choices=["snds", "synthea", "cms-rif"], help="default: the source's format")
    claims.add_argument("--quiet", action="store_true", help="no progress lines")
    claims.set_defaults(run=cmd_ingest_claims)

    pull = commands.add_parser("pull", help="pull an export from a server and load it")
    pull_kinds = pull.add_subparsers(title="kinds")
    pull_fhir = pull_kinds.add_parser("fhir", help="a FHIR Bulk Data ($export) server")
    pull_fhir.add_argument("--source", help="a source of the sources file with a 'bulk:' server")
    pull_fhir.add_argument("--url", help="another server base URL (with --source: load into it; alone: download)")
    pull_fhir.add_argument("--out", default="export", help="with --url alone: the folder to download into")
    pull_fhir.add_argument("--full-refresh", action="store_true", help="ignore _since: export everything")
    pull_fhir.add_argument("--cancel", action="store_true", help="cancel the export in flight (DELETE)")
    pull_fhir.set_defaults(run=cmd_pull_fhir)

    pseudonymise = commands.add_parser(
        "pseudonymise", help="a streaming filter: NDJSON resources on stdin, pseudonymised on stdout"
    )
    pseudonymise.add_argument("--source", help="use this source's id space and privacy policy")
    pseudonymise.add_argument("--compat", choices=["microsoft"], help="hash as Microsoft's FHIR anonymiser does")
    pseudonymise.add_argument("--key", help="the compatible mode's key (or HEALTH_INGEST_COMPAT_KEY)")
    pseudonymise.set_defaults(run=cmd_pseudonymise)

    warehouse = commands.add_parser("warehouse", help="the PostgreSQL warehouse")
    actions = warehouse.add_subparsers(title="actions")
    actions.add_parser("migrate", help="apply pending migrations").set_defaults(run=cmd_warehouse_migrate)
    status = actions.add_parser("status", help="recent batches and their counts")
    status.add_argument("--limit", type=int, default=20)
    status.add_argument("--source")
    status.set_defaults(run=cmd_warehouse_status)
    rekey = actions.add_parser("rekey", help="re-pseudonymise every batch under another key (needs the escrow)")
    rekey.add_argument("--to-key", help="a key id of the keyring (default: the active key)")
    rekey.set_defaults(run=cmd_warehouse_rekey)
    actions.add_parser("url", help="print the warehouse URL (starts the embedded one)").set_defaults(
        run=cmd_warehouse_url
    )

    quality = commands.add_parser("quality", help="data-quality results")
    quality_actions = quality.add_subparsers(title="actions")
    docs = quality_actions.add_parser("docs", help="render a batch's Data Docs and print where they are")
    docs.add_argument("--batch", required=True)
    docs.set_defaults(run=cmd_quality_docs)

    scaffold = quality_actions.add_parser(
        "scaffold-claims", help="write a suite for every claims table that has none, from its Table Schema"
    )
    scaffold.add_argument("--force", action="store_true", help="overwrite existing suites too")
    scaffold.set_defaults(run=cmd_quality_scaffold_claims)

    views = commands.add_parser("views", help="flat tables from the SQL-on-FHIR ViewDefinitions")
    view_actions = views.add_subparsers(title="actions")
    refresh = view_actions.add_parser("refresh", help="replace the rows of one committed batch's resources")
    refresh.add_argument("--batch", required=True)
    refresh.set_defaults(run=cmd_views)
    view_actions.add_parser("rebuild", help="rebuild every flat table from fhir.*").set_defaults(
        run=cmd_views, batch=None
    )

    retention = commands.add_parser("retention", help="purge raw data past its retention time")
    retention_actions = retention.add_subparsers(title="actions")
    purge = retention_actions.add_parser("purge", help="landing copies and quarantine records, logged")
    purge.add_argument("--days", type=int, help="keep this many days (default HEALTH_INGEST_RETENTION_DAYS or 30)")
    purge.set_defaults(run=cmd_retention_purge)

    keys = commands.add_parser("keys", help="pseudonymisation keys (never prints key material)")
    key_actions = keys.add_subparsers(title="actions")
    new = key_actions.add_parser("new", help="write a new keyring file with one random key")
    new.add_argument("--keyring", required=True)
    new.set_defaults(run=cmd_keys_new)
    rotate = key_actions.add_parser("rotate", help="add a fresh key and make it the active one")
    rotate.add_argument("--keyring", required=True)
    rotate.set_defaults(run=cmd_keys_rotate)
    jwks = key_actions.add_parser("jwks", help="a key pair for SMART Backend Services; prints the public JWKS")
    jwks.add_argument("--out", required=True, help="where to write the private key (PEM, mode 0600)")
    jwks.add_argument("--alg", choices=["RS384", "ES384"], default="RS384")
    jwks.set_defaults(run=cmd_keys_jwks)
    listing = key_actions.add_parser("list", help="key ids of a keyring")
    listing.add_argument("--keyring")
    listing.set_defaults(run=cmd_keys_list)
    return parser


def _progress_printer():
    started = time.monotonic()
    last_shown = [started]

    def progress(file_name: str, rows: int, done: bool) -> None:
        now = time.monotonic()
        if done or now - last_shown[0] >= 2:
            last_shown[0] = now
            rate = rows / max(now - started, 1e-6)
            print(f"  {file_name}: {rows:,} records{' (done)' if done else ''}, {rate:,.0f}/s", file=sys.stderr)

    return progress


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
