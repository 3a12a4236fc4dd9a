"""What the DAG files call: schedules built from the sources file, and the bodies of their tasks.

Heavy modules are imported inside the functions: Airflow parses DAG files every few seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from health_ingest.sources.registry import Source, load_sources

log = logging.getLogger(__name__)


def sources_of_kind(kind: str) -> list[Source]:
    return [s for s in load_sources().values() if s.kind == kind]


def schedule_for(source: Source):
    """The source's cron schedule, or-ed with an Asset whose watcher fires when a delivery lands."""
    from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable

    from health_ingest.sources.triggers import DeliveryReadyTrigger

    assets = None
    if source.inbox is not None:
        assets = Asset(
            name=f"{source.name}_deliveries",
            uri=f"file://{source.inbox}",
            watchers=[
                AssetWatcher(name=f"{source.name}_delivery_ready", trigger=DeliveryReadyTrigger(str(source.inbox)))
            ],
        )
    if source.schedule and assets is not None:
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(source.schedule, timezone="UTC"), assets=assets)
    if source.schedule:
        return CronTriggerTimetable(source.schedule, timezone="UTC")
    return assets


def doc_md(source: Source) -> str:
    inbox = f"`{source.inbox}`" if source.inbox else "none (deliveries are given as a parameter)"
    return (
        f"### {source.kind.upper()} source `{source.name}`\n\n{source.description}\n\n"
        f"- **Runs**: on `{source.schedule or 'no schedule'}` (UTC), and as soon as a delivery's `_READY` "
        f"marker appears in the inbox {inbox}.\n"
        "- **One batch per delivery**: land, read, check, pseudonymise, stage, verify, commit. A batch commits "
        "whole or not at all; bad records go to `ingest.quarantine` with file, line and reason.\n"
        + (
            f"- **Pulls** `$export` from `{source.bulk.url}` ({source.bulk.level} level): incremental from the last "
            "committed export's transactionTime; *Trigger DAG* with `full_refresh` exports everything again. An "
            "export in flight is resumed, never started twice.\n"
            if source.bulk
            else ""
        )
        + "- **Trigger a delivery by hand**: *Trigger DAG* with `delivery_path` set to a folder of NDJSON files.\n"
        "- **After a failure**: `health-ingest warehouse status` shows the batch and its error; the delivery stays "
        "pending and the next run takes it again.\n"
    )


def find_deliveries(source_name: str, params: dict[str, Any]) -> list[str]:
    """The deliveries this run loads: the one given as a parameter, else every pending one in the inbox."""
    from health_ingest.sources.inbox import pending_deliveries
    from health_ingest.sources.registry import get_source

    if params.get("delivery_path"):
        return [str(Path(params["delivery_path"]).resolve())]
    source = get_source(source_name)
    found = [str(p) for p in pending_deliveries(source.inbox)] if source.inbox else []
    log.info("source %s: %d pending deliveries", source_name, len(found))
    return found


def tables_alias(source: Source):
    """The alias through which a source's DAG emits one Asset event per warehouse table it wrote."""
    from airflow.sdk import AssetAlias

    return AssetAlias(f"{source.name}_warehouse_tables")


def ingest_delivery(source_name: str, delivery: str, outlet_events=None) -> dict[str, Any]:
    """Run one batch of a FHIR or claims source; configuration errors fail the task without retry."""
    from airflow.sdk.exceptions import AirflowFailException

    from health_ingest.errors import ConfigurationError
    from health_ingest.pipeline import run_fhir_batch
    from health_ingest.sources.bulk.pull import commit_hook, release_export
    from health_ingest.sources.inbox import mark_done
    from health_ingest.sources.registry import get_source

    source = get_source(source_name)
    try:
        if source.kind == "claims":
            from health_ingest.pipeline_claims import run_claims_batch

            result = run_claims_batch(Path(delivery), source)
        else:
            result = run_fhir_batch(Path(delivery), source, before_commit=commit_hook(source, Path(delivery)))
            release_export(source, Path(delivery))
    except ConfigurationError as error:
        raise AirflowFailException(str(error)) from None
    if source.inbox and Path(delivery).parent == source.inbox:
        mark_done(Path(delivery))
    if outlet_events is not None:
        publish_table_events(source, result, outlet_events)
    return result.to_summary()


def publish_table_events(source: Source, result, outlet_events) -> None:
    """One Asset event per table the batch wrote, carrying the batch id consumers read by."""
    from airflow.sdk import Asset

    from health_ingest.warehouse.consumers import table_asset_uri

    alias = outlet_events[tables_alias(source)]
    for name, counts in sorted(result.counts.items()):
        if counts.rows_loaded:
            if source.kind == "claims":
                from health_ingest.formats.claims import load_profile

                schema, table = "claims", load_profile(source.format).warehouse_table(name)
            else:
                schema, table = "fhir", name.lower()
            alias.add(
                Asset(table_asset_uri(schema, table)),
                extra={"batch_id": result.batch_id, "commit_seq": result.commit_seq, "rows": counts.rows_loaded},
            )


def refresh_flat_tables(summary: dict[str, Any]) -> dict[str, int]:
    """After a commit: the flat tables follow the batch (off the load's hot path, in their own transaction)."""
    from health_ingest.views.flat import refresh_batch
    from health_ingest.warehouse.connection import connect, warehouse_url

    conn = connect(warehouse_url())
    try:
        return refresh_batch(conn, summary["batch_id"])
    finally:
        conn.close()


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
