"""A source gone quiet: no committed batch within its expected cadence (`expect_every`). Alerts once when it goes
quiet and once when it delivers again, by the state the alerts table keeps."""

from __future__ import annotations

from datetime import datetime

from health_ingest.alerts import record
from health_ingest.alerts.content import Alert, cadence_alert


def cadence_alerts(conn, sources, now: datetime) -> list[tuple[Alert, tuple[str, ...]]]:
    """The alerts to send now, with each source's channels. A source that never committed is not judged."""
    due = []
    for source in sources:
        if source.expect_every is None:
            continue
        last = record.last_commit(conn, source.name)
        if last is None:
            continue
        batch_id, committed_at = last
        quiet = now - committed_at > source.expect_every
        previous = record.last_cadence_alert(conn, source.name)
        alerted_quiet = previous is not None and previous[0] == "quiet"
        when = committed_at.strftime("%Y-%m-%d %H:%M UTC")
        if quiet and not alerted_quiet:
            key = f"quiet:{source.name}:{batch_id}"
            due.append((cadence_alert("quiet", source.name, source.expect_every, when, event_key=key), source))
        elif not quiet and alerted_quiet:
            key = f"recovered:{source.name}:{batch_id}"
            due.append((cadence_alert("recovered", source.name, source.expect_every, when, event_key=key), source))
    return [(alert, source.alerts.channels) for alert, source in due]
