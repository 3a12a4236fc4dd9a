"""`health-ingest deliveries`: the deliveries a source's inbox set aside (rejected, or failed for good), and what an
operator does with them once the sender has answered: load them again, or drop them."""

from __future__ import annotations

import argparse
import textwrap


def add_commands(commands) -> None:
    deliveries = commands.add_parser("deliveries", help="deliveries set aside in a source's inbox")
    actions = deliveries.add_subparsers(title="actions")
    listing = actions.add_parser("list", help="set-aside deliveries, with their batch and its reason")
    listing.add_argument("--source", required=True)
    listing.set_defaults(run=cmd_deliveries_list)
    for name, run, what in (
        ("requeue", cmd_deliveries_requeue, "make pending again (after the sender's fix): the next run loads it"),
        ("discard", cmd_deliveries_discard, "delete from the inbox: it will never be loaded"),
    ):
        action = actions.add_parser(name, help=what)
        action.add_argument("--source", required=True)
        action.add_argument("batch", nargs="*", help="the batch id (or its first characters) that set it aside")
        action.add_argument("--all", action="store_true", help="every set-aside delivery of the source")
        action.set_defaults(run=run)


def cmd_deliveries_list(args: argparse.Namespace) -> int:
    from health_ingest.report import table

    entries = _set_aside(args.source)
    if not entries:
        print(f"source {args.source}: no delivery set aside")
        return 0
    reasons = _reasons([e.batch_id for e in entries])
    print(
        table(
            ["batch", "status", "since (UTC)", "delivery"], [(e.batch_id, e.status, e.since, e.label) for e in entries]
        )
    )
    for entry in entries:
        reason = reasons.get(entry.batch_id) or "no batch recorded"
        print(f"\n{entry.batch_id}:")
        print(textwrap.fill(reason, width=100, initial_indent="  ", subsequent_indent="  "))
    return 0


def cmd_deliveries_requeue(args: argparse.Namespace) -> int:
    from health_ingest.sources.inbox import requeue

    return _act(args, requeue, "requeued: the next run of the source loads it")


def cmd_deliveries_discard(args: argparse.Namespace) -> int:
    from health_ingest.sources.inbox import discard

    return _act(args, discard, "discarded: deleted from the inbox")


# --- implementation details -------------------------------------------------------------------


def _set_aside(source_name: str):
    from health_ingest.errors import ConfigurationError
    from health_ingest.sources.inbox import set_aside_deliveries
    from health_ingest.sources.registry import get_source

    source = get_source(source_name)
    if source.inbox is None:
        raise ConfigurationError(f"source {source.name} has no inbox")
    return set_aside_deliveries(source.inbox)


def _act(args: argparse.Namespace, action, said: str) -> int:
    entries = _set_aside(args.source)
    if not args.all and not args.batch:
        print("name the batches (see 'health-ingest deliveries list'), or give --all")
        return 2
    chosen = entries if args.all else [e for e in entries if any(e.batch_id.startswith(b) for b in args.batch)]
    unknown = [b for b in args.batch if not any(e.batch_id.startswith(b) for e in entries)]
    for batch in unknown:
        print(f"no delivery of source {args.source} was set aside by batch {batch}")
    for entry in chosen:
        action(entry)
        print(f"{entry.label} (batch {entry.batch_id}, {entry.status}) {said}")
    return 1 if unknown else 0


def _reasons(batch_ids: list[str]) -> dict[str, str]:
    """The error each batch recorded (read from the warehouse; missing when it cannot be reached)."""
    from health_ingest.warehouse.connection import connect, warehouse_url

    ids = [b for b in batch_ids if len(b) == 36]
    if not ids:
        return {}
    try:
        conn = connect(warehouse_url())
    except Exception:
        return {}
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT batch_id::text, error FROM ingest.batches WHERE batch_id::text = ANY(%s)", (ids,))
            return dict(cur.fetchall())
    finally:
        conn.close()
