"""`health-ingest warehouse`, `quality`, `views` and `retention`: the PostgreSQL warehouse and what it holds."""

from __future__ import annotations

import argparse
import textwrap

from health_ingest import config


def add_commands(commands) -> None:
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
            ["batch", "source", "status", "started (UTC)", "read", "loaded", "quarantined", "key", "delivery"],
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
                    b.delivery or "given by hand",
                )
                for b in rows
            ],
            right={4, 5, 6},
        )
    )
    failures = [b for b in rows if b.error]
    if failures:
        print("\nWhy:")
        for b in failures:
            stopped = f", stopped {b.failed_step}" if b.failed_step else ""
            print(f"  {b.batch_id}  {b.status}{stopped}")
            print(
                textwrap.fill(
                    b.error, width=100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False
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


def cmd_quality_scaffold_claims(args: argparse.Namespace) -> int:
    from health_ingest.quality.claims_suites import scaffold

    written = scaffold(config.project_root() / "expectations", force=args.force)
    for path in written:
        print(f"wrote {path.relative_to(config.project_root())}")
    print(f"{len(written)} suites written; existing ones were kept" if not args.force else f"{len(written)} written")
    return 0


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
