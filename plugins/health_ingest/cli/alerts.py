"""`health-ingest alerts`: check that a source's alert channels deliver, before a real failure needs them."""

from __future__ import annotations

import argparse

# exit codes of `alerts test`: which of the source's channels took the test alert
ALL_DELIVERED = 0
NO_CHANNEL = 2
SOME_UNDELIVERED = 7
NONE_DELIVERED = 8


def add_commands(commands) -> None:
    alerts = commands.add_parser("alerts", help="alert channels of the sources")
    actions = alerts.add_subparsers(title="actions")
    test = actions.add_parser(
        "test",
        help="send a test alert through every channel of a source",
        description=f"Exit codes: {ALL_DELIVERED} every channel delivered, {SOME_UNDELIVERED} some did not, "
        f"{NONE_DELIVERED} none did, {NO_CHANNEL} the source has no channel.",
    )
    test.add_argument("--source", required=True)
    test.set_defaults(run=cmd_alerts_test)


def cmd_alerts_test(args: argparse.Namespace) -> int:
    import uuid

    from health_ingest.airflow.notifiers import send
    from health_ingest.alerts.content import test_alert
    from health_ingest.sources.registry import get_source

    source = get_source(args.source)
    if not source.alerts.channels:
        print(f"source {source.name} has no alert channel (set 'alerts: channels:' in the sources file)")
        return NO_CHANNEL
    outcome = send(
        test_alert(source.name, ", ".join(source.alerts.channels), event_key=f"test:{uuid.uuid4()}"),
        source.alerts.channels,
    )
    for channel in source.alerts.channels:
        if channel in outcome.delivered:
            print(f"delivered    {channel}")
        else:
            print(f"UNDELIVERED  {channel}: {outcome.undelivered[channel]}")
    if not outcome.undelivered:
        return ALL_DELIVERED
    return SOME_UNDELIVERED if outcome.delivered else NONE_DELIVERED
