"""The `health-ingest` command: the demo, one-off ingestion, the warehouse, set-aside deliveries, alert channels and
the keys."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from health_ingest.cli import alerts, deliveries, demo, ingest, keys, warehouse
from health_ingest.errors import HealthIngestError

log = logging.getLogger("health_ingest")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # a batch stopped by SIGTERM fails cleanly, as one stopped by Ctrl-C
    try:
        return args.run(args) or 0
    except HealthIngestError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --- implementation details -------------------------------------------------------------------


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="health-ingest", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(title="commands")
    for group in (demo, ingest, warehouse, deliveries, alerts, keys):
        group.add_commands(commands)
    return parser
