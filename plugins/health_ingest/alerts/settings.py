"""Which channels a source alerts, and when: the `alerts:` blocks of the sources file (a default, then per source)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

KEYS = {"channels", "on_retry", "quarantine_warning", "late_after"}


@dataclass(frozen=True)
class AlertSettings:
    # Airflow connection ids: an `smtp` connection sends e-mail, an `apprise` one webhooks and chat
    channels: tuple[str, ...] = ()
    # also alert on each failed try that Airflow retries (the last failure always alerts)
    on_retry: bool = False
    # a committed batch with more than this share of its records quarantined sends a warning
    quarantine_warning: float = 0.01
    # a run not finished this long after it was queued sends a warning (an Airflow Deadline Alert)
    late_after: timedelta | None = None


def parse_alerts(
    options: object, default: AlertSettings | None, parse_duration: Callable[[str], timedelta]
) -> AlertSettings:
    """A source's block over the file's default: keys it names replace the default's, the others are kept.
    Durations are read as the sources file reads every duration (`parse_duration`)."""
    base = default or AlertSettings()
    if options is None:
        return base
    if not isinstance(options, dict) or set(options) - KEYS:
        raise ValueError(f"takes only {sorted(KEYS)}")
    changes: dict = {}
    if "channels" in options:
        channels = options["channels"] or []
        if not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels):
            raise ValueError("'channels' is a list of Airflow connection ids")
        changes["channels"] = tuple(channels)
    if "on_retry" in options:
        if not isinstance(options["on_retry"], bool):
            raise ValueError("'on_retry' is true or false")
        changes["on_retry"] = options["on_retry"]
    if "quarantine_warning" in options:
        share = options["quarantine_warning"]
        if not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
            raise ValueError("'quarantine_warning' is a share in [0, 1]")
        changes["quarantine_warning"] = float(share)
    if "late_after" in options:
        changes["late_after"] = parse_duration(options["late_after"]) if options["late_after"] else None
    return replace(base, **changes)
