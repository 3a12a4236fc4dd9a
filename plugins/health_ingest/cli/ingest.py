"""`health-ingest ingest`, `pull` and `pseudonymise`: one delivery loaded without Airflow, through the same
`load_delivery` as the DAG task, or pseudonymised as a stream."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from health_ingest import config
from health_ingest.errors import HealthIngestError


def add_commands(commands) -> None:
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
    pseudonymise.add_argument("--key", help=f"the compatible mode's key (or {config.ENV_COMPAT_KEY})")
    pseudonymise.set_defaults(run=cmd_pseudonymise)


def cmd_ingest_fhir(args: argparse.Namespace) -> int:
    """One batch without Airflow: the same code the DAG task calls."""
    source = _source_of_kind(args.source, "fhir")
    result = _load(source, args)
    for name in result.skipped_files:
        print(f"skipped {name}: not named after a FHIR resource type")
    return 0


def cmd_ingest_claims(args: argparse.Namespace) -> int:
    """One claims batch without Airflow: the same code the claims DAG calls."""
    from dataclasses import replace

    source = _source_of_kind(args.source, "claims")
    if args.profile and args.profile != source.format:
        source = replace(source, format=args.profile)
    _load(source, args)
    return 0


def cmd_pull_fhir(args: argparse.Namespace) -> int:
    """Pull a FHIR server's export and load it as one batch (or, with --url alone, only download it)."""
    from health_ingest.batch.load import load_delivery
    from health_ingest.sources.bulk import pull

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    if not args.source:
        if not args.url:
            print("error: give --source NAME (a declared source) or --url URL (a one-off download)", file=sys.stderr)
            return 2
        folder = pull.download_once(args.url, Path(args.out), progress=progress)
        print(f"export downloaded to {folder} (not loaded: give --source to load it)")
        return 0
    source = _source_of_kind(args.source, "fhir")
    if args.cancel:
        print(pull.cancel_export(source))
        return 0
    export = pull.pull_export(source, full_refresh=args.full_refresh, url=args.url, progress=progress)
    result = load_delivery(source, export.delivery).result
    _print_counts(result, "resource type")
    print(
        f"\nbatch {result.batch_id} committed in {result.elapsed:.1f} s; next export of {source.name} since "
        f"{export.transaction_time}"
    )
    return 0


def cmd_pseudonymise(args: argparse.Namespace) -> int:
    """NDJSON in, pseudonymised NDJSON out, streamed; rejected lines are reported on stderr, never echoed."""
    import orjson

    from health_ingest.quality.checks import Rejection, check_line

    pseudonymiser = _filter_pseudonymiser(args)
    written = rejected = 0
    removed: Counter[str] = Counter()
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
        if written % 1000 == 0:  # what was removed is logged as the walk goes: counted here, so memory stays flat
            removed.update({reason: n for (reason, _), n in pseudonymiser.take_removed().items()})
    out.flush()
    removed.update({reason: n for (reason, _), n in pseudonymiser.take_removed().items()})
    said = "".join(f", {n} {reason} removed" for reason, n in sorted(removed.items()))
    print(f"{written} resources written, {rejected} lines rejected{said}", file=sys.stderr)
    return 1 if rejected else 0


# --- implementation details -------------------------------------------------------------------


def _filter_pseudonymiser(args: argparse.Namespace):
    from health_ingest.privacy.resources import ResourcePseudonymiser

    if args.compat == "microsoft":
        from health_ingest.privacy.compat import MicrosoftCompatTokeniser

        key = args.key or os.environ.get(config.ENV_COMPAT_KEY)
        if not key:
            raise HealthIngestError(f"--compat microsoft needs --key KEY (or {config.ENV_COMPAT_KEY})")
        return ResourcePseudonymiser(MicrosoftCompatTokeniser(key))
    if not args.source:
        raise HealthIngestError("give --source NAME (its id space and privacy policy), or --compat microsoft")
    from health_ingest.batch.fhir import chunk_encoder
    from health_ingest.privacy.keyring import load_keyring
    from health_ingest.sources.registry import get_source

    return chunk_encoder(load_keyring(), get_source(args.source)).pseudonymiser


def _source_of_kind(name: str, kind: str):
    from health_ingest.sources.registry import get_source

    source = get_source(name)
    if source.kind != kind:
        raise HealthIngestError(f"source '{source.name}' is a {source.kind} source, not a {kind} source")
    return source


def _load(source, args: argparse.Namespace):
    """The delivery as one batch, through `load_delivery`, with its counts printed."""
    from health_ingest.batch.load import load_delivery

    progress = None if args.quiet else _progress_printer()
    result = load_delivery(source, Path(args.path), progress=progress).result
    _print_counts(result, "resource type" if source.kind == "fhir" else "table")
    print(f"\nbatch {result.batch_id} committed in {result.elapsed:.1f} s (key {result.key_id})")
    return result


def _print_counts(result, heading: str) -> None:
    from health_ingest.report import batch_counts_table

    counts = [(t, c.rows_read, c.rows_loaded, c.rows_quarantined) for t, c in sorted(result.counts.items())]
    print(batch_counts_table(counts).replace("resource type", heading.ljust(len("resource type")), 1))


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
