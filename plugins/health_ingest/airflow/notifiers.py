"""Alerts through Airflow notifiers: e-mail with the SMTP provider, webhooks and chat with the Apprise provider.

A channel is an Airflow connection: type `smtp` (recipients in its extra `to`) or `apprise` (its services in its
extra `config`). Sending never raises: an alert that cannot be sent is logged, and the task keeps the state the
batch decided. Each event is recorded in `ingest.alerts` first, so that a retry or a second process sends it never
twice.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from health_ingest.alerts.content import Alert, BatchFacts, RunFacts, batch_alert, late_alert, task_alert

log = logging.getLogger(__name__)

PATH = re.compile(r"(?<![\w.])/[^\s:;,'\"]+")


class AlertNotDelivered(Exception):
    """A channel's service did not accept the alert."""


@dataclass
class Delivery:
    delivered: list[str] = field(default_factory=list)
    undelivered: dict[str, str] = field(default_factory=dict)  # channel -> why


def send(alert: Alert, channels: tuple[str, ...] | list[str]) -> Delivery:
    """Send through every channel; each failure is kept with its reason, none is raised."""
    outcome = Delivery()
    for channel in channels:
        try:
            notifier_for(channel, alert).notify({})
        except Exception as error:  # any failure of a channel: the others and the task go on
            outcome.undelivered[channel] = _reason(error)
        else:
            outcome.delivered.append(channel)
    for channel in outcome.delivered:
        log.info("alert %s delivered to %s: %s", alert.event_key, channel, alert.subject)
    for channel, why in outcome.undelivered.items():
        log.error("alert %s NOT delivered to %s (%s): %s", alert.event_key, channel, why, alert.subject)
    return outcome


def alert_once(alert: Alert, channels: tuple[str, ...] | list[str]) -> Delivery | None:
    """Send the alert unless the warehouse says it was sent already; never raises."""
    try:
        conn = _warehouse()
    except Exception as error:
        log.warning(
            "alert %s: the warehouse cannot record it (%s); sent without the once-only check",
            alert.event_key,
            _reason(error),
        )
        conn = None
    try:
        from health_ingest.alerts import record

        if conn is not None and not record.claim(conn, alert):
            log.info("alert %s was sent already; not again", alert.event_key)
            return None
        if not channels:
            log.warning(
                "alert %s: source %s has no alert channel; recorded only: %s",
                alert.event_key,
                alert.source,
                alert.subject,
            )
        outcome = send(alert, channels)
        if conn is not None:
            record.record_delivery(conn, alert, outcome.delivered, sorted(outcome.undelivered))
        return outcome
    except Exception as error:
        log.error("alert %s could not be sent (%s): %s", alert.event_key, _reason(error), alert.subject)
        return None
    finally:
        if conn is not None:
            conn.close()


def notifier_for(channel: str, alert: Alert):
    """The provider's notifier for a channel, by the type of its connection."""
    from airflow.sdk import Connection

    connection = Connection.get(channel)
    extra = connection.extra_dejson or {}
    if connection.conn_type == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        if not extra.get("to"):
            raise AlertNotDelivered(f"connection {channel} has no recipients (its extra 'to')")
        return SmtpNotifier(
            smtp_conn_id=channel,
            to=extra["to"],
            from_email=extra.get("from_email") or connection.login or "health-ingest@localhost",
            subject=alert.subject,
            html_content=f"<pre>{html.escape(alert.body)}</pre>",
        )
    if connection.conn_type == "apprise":
        return _checked_apprise(channel, alert)
    raise AlertNotDelivered(f"connection {channel} is of type {connection.conn_type!r}, not smtp or apprise")


# --- task and deadline callbacks --------------------------------------------------------------


def on_ingest_failure(context: dict[str, Any]) -> None:
    """The task failed with no retry left (or at once, without retry): one alert for the batch or the task."""
    _task_failure_alert(context, final=True)


def on_ingest_retry(context: dict[str, Any]) -> None:
    """A try failed and Airflow retries it: an alert only for sources that ask for one (`on_retry: true`)."""
    _task_failure_alert(context, final=False)


def alert_quarantine_share(source, summary: dict[str, Any], context: dict[str, Any] | None) -> None:
    """A committed batch with more of its records quarantined than the source expects: one warning."""
    read, quarantined = summary["rows_read"], summary["rows_quarantined"]
    if not read or quarantined / read <= source.alerts.quarantine_warning:
        return
    try:
        facts = _batch_facts(summary["batch_id"])
    except Exception as error:
        log.error("batch %s: its record cannot be read for the alert (%s)", summary["batch_id"], _reason(error))
        return
    reason = (
        f"{quarantined} of {read} records quarantined ({quarantined / read:.1%}), above the source's threshold of "
        f"{source.alerts.quarantine_warning:.1%}; each quarantined record's file, line and reason are in "
        "ingest.quarantine"
    )
    alert = batch_alert("quarantine", facts, _run_facts(context or {}), reason=reason)
    alert_once(alert, source.alerts.channels)


async def on_run_late(source_name: str, interval_seconds: float, context: dict | None = None) -> None:
    """The Deadline Alert of an ingestion DAG: a run not finished `interval` after it was queued."""
    from health_ingest.sources.registry import get_source

    source = get_source(source_name)
    dag_run = (context or {}).get("dag_run") or {}
    # the scheduler passes the run as the REST API shows it (`dag_run_id`)
    run = RunFacts(
        dag_id=dag_run.get("dag_id", source.dag_id), run_id=dag_run.get("dag_run_id") or dag_run.get("run_id")
    )
    run = RunFacts(run.dag_id, run.run_id, log_url=_run_url(run.dag_id, run.run_id))
    alert = late_alert(
        source.name, run, timedelta(seconds=interval_seconds), event_key=f"late:{run.dag_id}:{run.run_id}"
    )
    await asyncio.to_thread(alert_once, alert, source.alerts.channels)


def run_deadline(source):
    """The Deadline Alert of a source's DAG, when the source sets `alerts.late_after`."""
    if source.alerts.late_after is None:
        return None
    from airflow.sdk.definitions.callback import AsyncCallback
    from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=source.alerts.late_after,
        callback=AsyncCallback(
            on_run_late,
            kwargs={"source_name": source.name, "interval_seconds": source.alerts.late_after.total_seconds()},
        ),
        name=f"{source.name}_run_late",
    )


# --- implementation details -------------------------------------------------------------------


def _task_failure_alert(context: dict[str, Any], *, final: bool) -> None:
    try:
        from health_ingest.sources.registry import load_sources

        ti = context["ti"]
        source = next(s for s in load_sources().values() if s.dag_id == ti.dag_id)
        if not final and not source.alerts.on_retry:
            return
        error = context.get("exception")
        kind = "retry" if not final else error_kind(error)
        run = _run_facts(context)
        batch_id = getattr(error, "batch_id", None)
        if batch_id:
            facts = _batch_facts(batch_id)
            if final and facts.status == "rejected":
                kind = "rejected_ceiling" if (facts.error or "").startswith("quarantine ceiling") else "rejected"
            key = f"batch:{batch_id}:{kind}"
            alert = batch_alert(kind, facts, run, event_key=key)
        else:
            key = f"task:{ti.dag_id}:{ti.run_id}:{ti.task_id}:{ti.map_index}:{kind}"
            if kind == "retry":
                key += f":{ti.try_number}"
            alert = task_alert(kind, source.name, run, _safe_reason(error), event_key=key)
        alert_once(alert, source.alerts.channels)
    except Exception as error:  # a callback never changes the task's outcome
        log.error("the failure alert could not be built (%s)", _reason(error))


def error_kind(error: BaseException | None) -> str:
    """Which 'what to do next' a final failure calls for, from the error's class."""
    explicit = getattr(error, "alert_kind", None)
    if explicit:
        return explicit
    names = {cls.__name__ for cls in type(error).__mro__} if error is not None else set()
    if "BatchRejected" in names:
        return "rejected"
    if "JurisdictionRefused" in names:
        return "hosting"
    if "ExportExpired" in names:
        return "export_expired"
    if "ExportError" in names and "deadline" in str(error):
        return "export_deadline"
    if "DeliveryError" in names:
        return "delivery"
    if "ConfigurationError" in names:
        return "configuration"
    return "failed"


def _batch_facts(batch_id: str) -> BatchFacts:
    conn = _warehouse()
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT batch_id::text, source, status, delivery, rows_read, rows_loaded, rows_quarantined, error,
                       failed_step, dq_report
                  FROM ingest.batches WHERE batch_id = %s
                """,
                (batch_id,),
            )
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        raise LookupError(f"batch {batch_id} is not in the warehouse")
    return BatchFacts(*row)


def _run_facts(context: dict[str, Any]) -> RunFacts:
    ti = context.get("ti")
    if ti is None:
        return RunFacts(dag_id="none (outside Airflow)")
    try:
        log_url = ti.log_url
    except Exception:
        log_url = None
    return RunFacts(
        dag_id=ti.dag_id,
        run_id=ti.run_id,
        task_id=ti.task_id + (f"[{ti.map_index}]" if getattr(ti, "map_index", -1) >= 0 else ""),
        try_number=ti.try_number,
        max_tries=getattr(ti, "max_tries", None),
        log_url=log_url,
    )


def _run_url(dag_id: str, run_id: str | None) -> str | None:
    try:
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="http://localhost:8080").rstrip("/")
    except Exception:
        return None
    return f"{base}/dags/{dag_id}/runs/{run_id}" if run_id else f"{base}/dags/{dag_id}"


def _safe_reason(error: BaseException | None) -> str:
    """The project's own messages quote no record; their paths are cut to the delivery's label. Other errors
    are named by their class only: a library's message may quote a value."""
    if error is None:
        return "no error was passed to the callback"
    names = {cls.__name__ for cls in type(error).__mro__}
    if "HealthIngestError" not in names and "AirflowFailException" not in names:
        return f"{type(error).__name__} (see the task log)"
    from health_ingest.sources.inbox import delivery_label

    return PATH.sub(lambda m: delivery_label(m.group(0).rstrip("/").rsplit("/", 1)[-1]), str(error))


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _warehouse():
    from health_ingest.warehouse.connection import connect, warehouse_url

    conn = connect(warehouse_url())
    conn.autocommit = True
    return conn


def _checked_apprise(channel: str, alert: Alert):
    """The Apprise notifier, told to raise when no service accepted the alert (its hook drops that answer)."""
    import apprise
    from airflow.providers.apprise.notifications.apprise import AppriseNotifier

    class CheckedAppriseNotifier(AppriseNotifier):
        def notify(self, context):
            services = apprise.Apprise()
            self.hook.set_config_from_conn(conn=self.hook.get_connection(self.apprise_conn_id), apprise_obj=services)
            if not len(services):
                raise AlertNotDelivered(f"connection {self.apprise_conn_id} configures no service")
            accepted = services.notify(
                body=self.body, title=self.title, notify_type=self.notify_type, body_format=self.body_format
            )
            if not accepted:
                raise AlertNotDelivered("the service did not accept it")

    notify_type = {"error": "failure", "warning": "warning"}.get(alert.severity, "info")
    return CheckedAppriseNotifier(
        apprise_conn_id=channel, title=alert.subject, body=alert.body, notify_type=notify_type
    )
