"""What an alert says: built from the batch record and the error's kind, never from a record's values.

An operator reads one alert and knows what happened, why, how much, where to look and what to do next.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from datetime import timedelta

# Subjects start with the rank, so that a mailbox sorted by subject lists the gravest first, then by source.
SEVERITIES = {"error": "P1 ERROR", "warning": "P2 WARNING", "info": "P3 INFO"}

# One line per kind of event: what the operator does next.
NEXT_STEP = {
    "rejected": "Ask the sender to fix the delivery and deliver it again; the delivery is set aside "
    "(health-ingest deliveries list --source {source}), and 'deliveries requeue' loads it after a fix.",
    "rejected_ceiling": "Ask the sender to fix the file named above and deliver again; the delivery is set aside "
    "(health-ingest deliveries list --source {source}).",
    "failed": "Nothing to do if it was transient: the next run of the source takes the delivery again. If it "
    "fails again, read the task log below.",
    "failed_for_good": "The delivery is set aside: fix the cause named above, then 'health-ingest deliveries "
    "requeue --source {source}' loads it again.",
    "hosting": "The warehouse's hosting was refused: fix the hosting policy or the warehouse connection's "
    "declaration, then trigger the DAG again.",
    "configuration": "Fix the configuration named above (sources file, keyring, connection), then trigger the DAG "
    "again.",
    "delivery": "The delivery cannot be read as a whole (missing folder, no files): check the inbox and ask the "
    "sender to deliver again.",
    "quarantine": "The batch committed, but more records than usual were quarantined: look at the quality report "
    "and ask the sender about the files named there.",
    "retry": "Airflow retries the task; nothing to do yet. A last failure sends its own alert.",
    "late": "The run is still not finished: look at the run in Airflow (a task waiting for a worker, a pool, a "
    "stuck export) before the next one queues behind it.",
    "export_deadline": "The server's export did not finish before its deadline; it stays recorded and the next run "
    "polls it again. If it repeats, ask the server's team.",
    "export_expired": "The server no longer has the export; the next run starts a new one. If it repeats, the "
    "download is slower than the server keeps files: ask the server's team.",
    "quiet": "No batch committed within the expected cadence: check that the sender still delivers and that the "
    "DAG is not paused.",
    "recovered": "Nothing to do: the source delivers again.",
    "test": "Nothing to do: this alert checks that the channel works.",
}


@dataclass(frozen=True)
class BatchFacts:
    """What the alert needs to know of a batch: the batch record's columns, nothing of its records."""

    batch_id: str
    source: str
    status: str
    delivery: str | None
    rows_read: int
    rows_loaded: int
    rows_quarantined: int
    error: str | None
    failed_step: str | None = None
    dq_report: str | None = None


@dataclass(frozen=True)
class Alert:
    """One event, said once: `event_key` is what deduplicates it across retries and processes."""

    event_key: str
    kind: str
    severity: str
    source: str
    subject: str
    body: str
    batch_id: str | None = None


@dataclass(frozen=True)
class RunFacts:
    """Where the event happened in Airflow."""

    dag_id: str
    run_id: str | None = None
    task_id: str | None = None
    try_number: int | None = None
    max_tries: int | None = None
    log_url: str | None = None


def batch_alert(
    kind: str, facts: BatchFacts, run: RunFacts, *, reason: str | None = None, event_key: str | None = None
) -> Alert:
    """A batch's outcome: failed, rejected, retried, or committed with many records quarantined."""
    severity = "warning" if kind in {"quarantine", "retry"} else "error"
    what = {
        "quarantine": f"batch committed with {_share(facts)} quarantined",
        "retry": f"batch {facts.status}, Airflow retries it",
    }.get(kind, f"batch {facts.status}")
    why = reason or facts.error or "no message recorded"
    lines = [
        f"What happened: {what}.",
        f"  source:   {facts.source}",
        f"  DAG:      {run.dag_id}" + (f", run {run.run_id}" if run.run_id else ""),
        f"  batch id: {facts.batch_id}",
        f"  status:   {facts.status}",
        f"  delivery: {facts.delivery or 'given by hand'}",
    ]
    if facts.failed_step:
        lines.append(f"  step:     {facts.failed_step}")
    if run.task_id:
        lines.append(f"  task:     {run.task_id}" + _tries(run))
    lines += [
        "",
        "Why:",
        *_wrapped(why),
        "",
        f"Counts: {facts.rows_read} read, {facts.rows_loaded} loaded, {facts.rows_quarantined} quarantined.",
        "",
        "Where to look:",
        f"  task log:       {run.log_url or 'not known (the batch ran outside Airflow)'}",
        f"  quality report: {facts.dq_report or f'health-ingest quality docs --batch {facts.batch_id}'}",
        f"  the batch:      health-ingest warehouse status --source {facts.source}",
        "",
        "What to do next:",
        *_wrapped(NEXT_STEP[kind].format(source=facts.source)),
    ]
    short = facts.batch_id[:8]
    return Alert(
        event_key=event_key or f"batch:{facts.batch_id}:{kind}",
        kind=kind,
        severity=severity,
        source=facts.source,
        subject=_subject(severity, facts.source, f"{what} ({short}): {_first_words(why)}"),
        body="\n".join(lines) + "\n",
        batch_id=facts.batch_id,
    )


def task_alert(kind: str, source: str, run: RunFacts, reason: str, *, event_key: str) -> Alert:
    """A failure before any batch existed (a missing delivery, a refused hosting, an export that did not come)."""
    severity = "warning" if kind in {"retry", "export_deadline"} else "error"
    what = {
        "export_deadline": "Bulk export past its deadline",
        "export_expired": "Bulk export expired",
        "retry": "task failed, Airflow retries it",
    }.get(kind, "task failed before a batch was loaded")
    lines = [
        f"What happened: {what}.",
        f"  source:   {source}",
        f"  DAG:      {run.dag_id}" + (f", run {run.run_id}" if run.run_id else ""),
        f"  task:     {run.task_id}" + _tries(run),
        "  batch id: none (nothing was loaded)",
        "",
        "Why:",
        *_wrapped(reason),
        "",
        "Where to look:",
        f"  task log: {run.log_url or 'not known'}",
        "",
        "What to do next:",
        *_wrapped(NEXT_STEP[kind].format(source=source)),
    ]
    return Alert(
        event_key,
        kind,
        severity,
        source,
        _subject(severity, source, f"{what}: {_first_words(reason)}"),
        "\n".join(lines) + "\n",
    )


def late_alert(source: str, run: RunFacts, interval: timedelta, *, event_key: str) -> Alert:
    """A run still not finished `interval` after it was queued (an Airflow Deadline Alert)."""
    lines = [
        "What happened: a run is late.",
        f"  source:   {source}",
        f"  DAG:      {run.dag_id}, run {run.run_id}",
        f"  deadline: {_duration(interval)} after the run was queued",
        "",
        "Where to look:",
        f"  the run: {run.log_url or 'the DAG in the Airflow UI'}",
        "",
        "What to do next:",
        *_wrapped(NEXT_STEP["late"]),
    ]
    subject = _subject("warning", source, f"run late: not finished {_duration(interval)} after it was queued")
    return Alert(event_key, "late", "warning", source, subject, "\n".join(lines) + "\n")


def cadence_alert(kind: str, source: str, expect_every: timedelta, last_commit: str | None, *, event_key: str):
    """A source gone quiet (no committed batch within its cadence), or back."""
    what = "source quiet" if kind == "quiet" else "source delivers again"
    severity = "warning" if kind == "quiet" else "info"
    lines = [
        f"What happened: {what}.",
        f"  source:          {source}",
        f"  expected every:  {_duration(expect_every)}",
        f"  last committed:  {last_commit or 'never'}",
        "",
        "Where to look:",
        f"  health-ingest warehouse status --source {source}",
        "",
        "What to do next:",
        *_wrapped(NEXT_STEP[kind]),
    ]
    detail = f"no committed batch for more than {_duration(expect_every)}" if kind == "quiet" else "a batch committed"
    return Alert(
        event_key, kind, severity, source, _subject(severity, source, f"{what}: {detail}"), "\n".join(lines) + "\n"
    )


def test_alert(source: str, channel: str, *, event_key: str) -> Alert:
    body = (
        "What happened: nothing; this is a test of the alert channels.\n"
        f"  source:  {source}\n  channel: {channel}\n\nWhat to do next:\n  {NEXT_STEP['test']}\n"
    )
    return Alert(event_key, "test", "info", source, _subject("info", source, "test alert"), body)


# --- implementation details -------------------------------------------------------------------


def _subject(severity: str, source: str, text: str) -> str:
    return f"[health-ingest {SEVERITIES[severity]}] {source}: {text}"[:200]


def _first_words(text: str, limit: int = 90) -> str:
    first = " ".join(text.split())
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def _wrapped(text: str) -> list[str]:
    lines = textwrap.wrap(
        " ".join(text.split()), width=100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
    )
    return lines or ["  -"]


def _tries(run: RunFacts) -> str:
    if run.try_number is None or run.max_tries is None:
        return ""
    return f" (try {run.try_number} of {run.max_tries + 1})"


def _share(facts: BatchFacts) -> str:
    share = facts.rows_quarantined / facts.rows_read if facts.rows_read else 0.0
    return f"{share:.1%} of {facts.rows_read} records"


def _duration(interval: timedelta) -> str:
    if interval < timedelta(minutes=1):
        return f"{int(interval.total_seconds())} s"
    minutes = int(interval.total_seconds() // 60)
    hours, minutes = divmod(minutes, 60)
    if hours and minutes:
        return f"{hours}h{minutes:02d}"
    return f"{hours}h" if hours else f"{minutes} min"
