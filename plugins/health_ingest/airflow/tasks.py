"""The bodies of the DAG files' tasks: each calls the package's one entry point for its action and turns what
Airflow must know (retry or not, Asset events) into Airflow's terms.

Heavy modules are imported inside the functions: Airflow parses DAG files every few seconds.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from health_ingest.errors import retryable
from health_ingest.sources.registry import Source

log = logging.getLogger(__name__)


def find_deliveries(source_name: str, params: dict[str, Any]) -> list[dict[str, str]]:
    """The deliveries this run loads: the one given as a parameter (inside the source's allowed roots, else the
    run fails without retry), else every pending one in the inbox. Each is named by its label and a keyed reference
    only (`sources.references`): what a task returns stays in Airflow's metadata, and a folder's name may name a
    person."""
    from health_ingest.sources.inbox import pending_deliveries
    from health_ingest.sources.references import INBOX, found_delivery, given_delivery
    from health_ingest.sources.registry import get_source

    with failing_without_retry():
        source = get_source(source_name)
        if params.get("delivery_path"):
            return [given_delivery(source.allowed_delivery(params["delivery_path"]))]
        found = pending_deliveries(source.inbox) if source.inbox else []
        deliveries = [found_delivery(source, folder, INBOX) for folder in found]
    log.info("source %s: %d pending deliveries", source_name, len(deliveries))
    return deliveries


def ingest_delivery(source_name: str, delivery: dict[str, str] | str, params: dict[str, Any] | None = None) -> dict:
    """Run one batch of a source; an error no retry can help (a rejection, a missing delivery, a configuration)
    fails the task at once, any other lets Airflow retry. A delivery no try will load any more (rejected, or failed
    on the last try) is set aside in the inbox; a committed batch with many records quarantined sends a warning.
    `delivery` is as `find_deliveries` names it (found again here, the run's `params` holding a `delivery_path`),
    or a folder's path (a run mapped before deliveries were named so, a caller outside Airflow)."""
    from health_ingest.airflow.notifiers import alert_quarantine_share
    from health_ingest.batch.load import load_delivery
    from health_ingest.sources.inbox import delivery_label
    from health_ingest.sources.references import resolve_delivery
    from health_ingest.sources.registry import get_source

    _export_map_index()
    _name_mapped_task(delivery_label(delivery) if isinstance(delivery, str) else delivery["label"])
    with failing_without_retry():
        source = get_source(source_name)
        folder = Path(delivery) if isinstance(delivery, str) else resolve_delivery(source, delivery, params or {})
        try:
            loaded = load_delivery(source, folder)
        except Exception as error:
            if not retryable(error) or _last_try():
                set_aside_delivery(source, folder, error)
            raise
    summary = loaded.result.to_summary()
    alert_quarantine_share(source, summary, _task_context())
    tables = [{"schema": t.schema, "table": t.table, "rows": t.rows} for t in loaded.tables]
    return {**summary, "tables": tables}


def set_aside_delivery(source: Source, delivery: Path, error: BaseException) -> None:
    """An inbox delivery that no retry will load leaves the pending set (`_REJECTED` or `_FAILED`, holding the
    batch id), so that the next runs take only newer deliveries; `health-ingest deliveries` acts on it."""
    from health_ingest.errors import BatchRejected
    from health_ingest.sources.inbox import set_aside

    if source.inbox is None or delivery.parent != source.inbox or not delivery.is_dir():
        return
    status = "rejected" if isinstance(error, BatchRejected) else "failed"
    batch_id = getattr(error, "batch_id", None)
    set_aside(delivery, status, batch_id)
    log.warning("source %s: delivery set aside as %s by batch %s", source.name, status, batch_id)


def route_delivery_messages(triggering_asset_events) -> list[dict[str, Any]]:
    """One `TriggerDagRunOperator` call per accepted delivery message; refused ones are logged and dropped."""
    from health_ingest.sources.messages import route_messages
    from health_ingest.sources.registry import load_sources

    messages = [
        (event.extra or {}).get("payload", {}).get("data")
        for events in (triggering_asset_events or {}).values()
        for event in events
    ]
    return [route.trigger_kwargs() for route in route_messages(messages, load_sources())]


def _export_map_index() -> None:
    """The batch row records which task instance loaded it (the UI links to its log); Airflow exports the dag, run
    and task ids to the environment, the map index is added here."""
    import os

    from airflow.sdk import get_current_context

    from health_ingest import config

    try:
        os.environ[config.ENV_AIRFLOW_MAP_INDEX] = str(get_current_context()["ti"].map_index)
    except Exception:  # called outside a running task
        os.environ.pop(config.ENV_AIRFLOW_MAP_INDEX, None)


@contextmanager
def failing_without_retry():
    """The project's errors that say no retry can help become `AirflowFailException`, which Airflow does not
    retry; the others are raised as they are. The failure alert reads the batch id and the error's kind off it."""
    from health_ingest.errors import HealthIngestError

    try:
        yield
    except HealthIngestError as error:
        if error.retryable:
            raise
        from airflow.sdk.exceptions import AirflowFailException

        from health_ingest.airflow.notifiers import error_kind

        failure = AirflowFailException(str(error))
        failure.batch_id = getattr(error, "batch_id", None)
        failure.alert_kind = error_kind(error)
        raise failure from None


def announce_tables(source_name: str, summary: dict[str, Any], outlet_events) -> dict[str, Any]:
    """One Asset event per table the batch wrote, carrying the batch id consumers read by. A task of its own after
    the load, so that a failure to record the events never loads the delivery again. Each table's Asset is
    declared beforehand, as the task's inlet (`schedules.table_assets`), so that no event has to create one."""
    from airflow.sdk import Asset

    from health_ingest.airflow.schedules import tables_alias
    from health_ingest.sources.registry import get_source
    from health_ingest.warehouse.connection import configured_warehouse_url
    from health_ingest.warehouse.consumers import table_asset_uri

    url = configured_warehouse_url()
    alias = outlet_events[tables_alias(get_source(source_name))]
    for written in summary.get("tables", []):
        alias.add(
            Asset(table_asset_uri(written["schema"], written["table"], url)),
            extra={"batch_id": summary["batch_id"], "commit_seq": summary["commit_seq"], "rows": written["rows"]},
        )
    return summary


def refresh_flat_tables(source_name: str, summary: dict[str, Any], outlet_events=None) -> dict[str, int]:
    """After a commit: the flat tables follow the batch (off the load's hot path, in their own transaction); their
    Asset events go out only then, so that a consumer scheduled on them reads the batch's flat rows."""
    from airflow.sdk import Asset

    from health_ingest.airflow.schedules import flat_alias
    from health_ingest.sources.registry import get_source
    from health_ingest.views.flat import refresh_batch
    from health_ingest.warehouse.connection import connect, warehouse_url
    from health_ingest.warehouse.consumers import table_asset_uri

    with failing_without_retry():
        url = warehouse_url()
        conn = connect(url)
        try:
            written = refresh_batch(conn, summary["batch_id"])
        finally:
            conn.close()
    if outlet_events is not None:
        alias = outlet_events[flat_alias(get_source(source_name))]
        for name, rows in sorted(written.items()):
            alias.add(
                Asset(table_asset_uri("flat", name, url)),
                extra={"batch_id": summary["batch_id"], "commit_seq": summary.get("commit_seq"), "rows": rows},
            )
    return written


def publish_data_docs(summary: dict[str, Any]) -> str | None:
    """After a commit: the batch's Data Docs (Great Expectations is imported here, not in the load)."""
    from health_ingest.quality.docs import publish_data_docs as publish
    from health_ingest.warehouse.connection import connect, warehouse_url

    conn = connect(warehouse_url())
    conn.autocommit = True
    try:
        index = publish(conn, summary["batch_id"])
    finally:
        conn.close()
    return str(index) if index else None


def purge_raw_data() -> dict[str, int]:
    """Landing copies and quarantine records past their retention time, each purge recorded."""
    from datetime import timedelta

    from health_ingest.warehouse.connection import connect, warehouse_url
    from health_ingest.warehouse.retention import purge_raw_data, retention_days

    conn = connect(warehouse_url())
    try:
        report = purge_raw_data(conn, older_than=timedelta(days=retention_days()))
    finally:
        conn.close()
    return {"landing_folders": report.landing_folders, "quarantine_records": report.quarantine_records}


def check_quiet_sources() -> dict[str, str]:
    """The maintenance DAG's check: one alert for each source that went quiet, or came back, since the last one."""
    from datetime import UTC, datetime

    from health_ingest.airflow.notifiers import alert_once
    from health_ingest.alerts.cadence import cadence_alerts
    from health_ingest.sources.registry import load_sources
    from health_ingest.warehouse.connection import connect, warehouse_url

    conn = connect(warehouse_url())
    conn.autocommit = True
    try:
        due = cadence_alerts(conn, load_sources().values(), datetime.now(UTC))
    finally:
        conn.close()
    for alert, channels in due:
        alert_once(alert, channels)
    return {alert.source: alert.kind for alert, _ in due}


# --- implementation details -------------------------------------------------------------------


def _name_mapped_task(label: str) -> None:
    """The mapped task is shown by its delivery's label (`map_index_template`), never by a raw folder name."""
    from contextlib import suppress

    from airflow.sdk import get_current_context

    with suppress(RuntimeError):  # called outside a task
        get_current_context()["delivery_label"] = label


def _task_context() -> dict:
    try:
        from airflow.sdk import get_current_context

        return get_current_context()
    except Exception:  # called outside a task
        return {}


def _last_try() -> bool:
    """Whether this try is the task's last: Airflow will not retry a failure now (outside a task, every try is)."""
    ti = _task_context().get("ti")
    return ti is None or ti.try_number > ti.max_tries
