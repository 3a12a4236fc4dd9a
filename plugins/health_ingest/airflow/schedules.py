"""What the DAG files build from the sources file: which sources, their schedules, their documentation, their Asset
aliases and the Assets of the tables they announce. Airflow is imported inside the functions: Airflow parses DAG
files every few seconds."""

from __future__ import annotations

from health_ingest.sources.registry import Source, load_sources


def sources_of_kind(kind: str) -> list[Source]:
    return [s for s in load_sources().values() if s.kind == kind]


def schedule_for(source: Source):
    """The source's cron schedule, or-ed with an Asset whose watcher fires when a delivery lands."""
    from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable

    from health_ingest.airflow.triggers import DeliveryReadyTrigger

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


def tables_alias(source: Source):
    """The alias through which a source's DAG emits one Asset event per warehouse table it wrote."""
    from airflow.sdk import AssetAlias

    return AssetAlias(f"{source.name}_warehouse_tables")


def flat_alias(source: Source):
    """The alias through which a FHIR source's DAG emits one Asset event per flat table, once it is refreshed."""
    from airflow.sdk import AssetAlias

    return AssetAlias(f"{source.name}_flat_tables")


def table_assets(source: Source) -> list:
    """Every warehouse table the source's batches can write, as the Assets its events name (`fhir.<type>`, or its
    claims profile's tables). Declared as the announcing task's inlets, so that Airflow holds each Asset before any
    event: an Asset that two sources' events create at the same instant breaks a unique key in Airflow's database,
    and Airflow fails one of the two tasks without a retry. A yearly claims table (SNDS's `T_MCO19B`) cannot be
    listed: its Asset is made by its first event."""
    if source.kind == "fhir":
        from health_ingest.formats.resource_types import RESOURCE_TYPES

        return _assets("fhir", sorted(t.lower() for t in RESOURCE_TYPES))
    from health_ingest.formats.claims import load_profile

    profile = load_profile(source.format)
    return _assets("claims", [profile.warehouse_table(name) for name in profile.tables.named_tables()])


def flat_table_assets() -> list:
    """The flat tables' Assets, declared as the refreshing task's inlets (see `table_assets`)."""
    from health_ingest.views.flat import repository_view_names

    return _assets("flat", repository_view_names())


def _assets(schema: str, tables: list[str]) -> list:
    from airflow.sdk import Asset

    from health_ingest.warehouse.connection import configured_warehouse_url
    from health_ingest.warehouse.consumers import table_asset_uri

    url = configured_warehouse_url()
    return [Asset(table_asset_uri(schema, table, url)) for table in tables]


def delivery_messages_asset():
    """The Asset whose watcher listens on the Redis channel where senders announce deliveries (Airflow's
    MessageQueueTrigger; the connection `health_ingest_queue` names the Redis)."""
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
    from airflow.sdk import Asset, AssetWatcher

    from health_ingest import config

    trigger = MessageQueueTrigger(
        scheme="redis+pubsub", channels=[config.delivery_channel()], redis_conn_id=config.QUEUE_CONN_ID, poll_interval=1
    )
    return Asset(
        name="health_ingest_delivery_messages", watchers=[AssetWatcher(name="delivery_message", trigger=trigger)]
    )


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
        "- **After a failure**: a rejected delivery fails at once, without retry; one that fails on the last try "
        "is set aside too (`_REJECTED` / `_FAILED` in the inbox), so later runs take only newer deliveries. The "
        "source's alert channels are told once; `health-ingest deliveries list|requeue|discard` acts on it, "
        "`health-ingest warehouse status` shows the batch and its whole reason.\n"
    )
