"""Ingestion: one DAG per source of `sources.yml` (FHIR exports and bundles; SNDS, Synthea CSV and CMS RIF claims),
each delivery loaded as one batch. A FHIR source with a `bulk:` server pulls its next `$export` first.

A DAG runs on its source's schedule and as soon as a delivery's `_READY` marker lands in the source's inbox (or
with `delivery_path` from the trigger form). It maps one ingestion task over the pending deliveries; the quality
suites gate each batch before it commits and its Data Docs are rendered; the tables it wrote are announced (one
Asset event each); for FHIR, the flat SQL-on-FHIR tables are then refreshed, gated by their own suites, and only
then announced too. A failure alerts the source's channels once (after the last try; a rejection at once, never
retried) and sets the delivery aside; a run late past the source's `late_after` alerts through an Airflow Deadline
Alert. All logic lives in `health_ingest`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task
from health_ingest.airflow.notifiers import on_ingest_failure, on_ingest_retry, run_deadline
from health_ingest.airflow.operators import PullExportOperator
from health_ingest.airflow.schedules import (
    doc_md,
    flat_alias,
    flat_table_assets,
    schedule_for,
    sources_of_kind,
    table_assets,
    tables_alias,
)

for source in [*sources_of_kind("fhir"), *sources_of_kind("claims")]:
    with DAG(
        dag_id=source.dag_id,
        description=f"Load {source.format} deliveries of {source.name} into the warehouse",
        doc_md=doc_md(source),
        schedule=schedule_for(source),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        tags=[source.kind, source.format, "ingest", *source.tags],
        default_args={
            "owner": source.owner,
            "retries": source.retries,
            "retry_delay": source.retry_delay,
            "on_failure_callback": on_ingest_failure,
            "on_retry_callback": on_ingest_retry,
        },
        deadline=run_deadline(source),
        params={
            "delivery_path": Param(
                None,
                type=["null", "string"],
                description="A folder to load now, instead of the inbox's pending deliveries.",
            ),
            **(
                {"full_refresh": Param(False, type="boolean", description="Export everything, ignoring _since.")}
                if source.bulk
                else {}
            ),
        },
    ) as dag:
        if source.bulk:
            deliveries = PullExportOperator(task_id="pull_export", source_name=source.name).output
        else:

            @task
            def find_deliveries(source_name: str, params=None) -> list[dict]:
                from health_ingest.airflow.tasks import find_deliveries

                return find_deliveries(source_name, params or {})

            deliveries = find_deliveries(source.name)

        # a delivery travels as its label and a keyed reference (a folder's name may name a person)
        @task(max_active_tis_per_dagrun=1, map_index_template="{{ delivery_label }}")
        def ingest(source_name: str, delivery: dict, params=None) -> dict:
            from health_ingest.airflow.tasks import ingest_delivery

            return ingest_delivery(source_name, delivery, params or {})

        summaries = ingest.partial(source_name=source.name).expand(delivery=deliveries)

        # inlets: the tables it may announce, known to Airflow before their first event
        @task(inlets=table_assets(source), outlets=[tables_alias(source)], retries=3, retry_delay=timedelta(seconds=5))
        def announce_tables(source_name: str, summary: dict, outlet_events=None) -> dict:
            from health_ingest.airflow.tasks import announce_tables

            return announce_tables(source_name, summary, outlet_events)

        announced = announce_tables.partial(source_name=source.name).expand(summary=summaries)

        @task
        def publish_data_docs(summary: dict) -> str | None:
            from health_ingest.airflow.tasks import publish_data_docs

            return publish_data_docs(summary)

        publish_data_docs.expand(summary=summaries)

        if source.kind == "fhir":

            @task(inlets=flat_table_assets(), outlets=[flat_alias(source)], retry_delay=timedelta(seconds=5))
            def refresh_flat_tables(source_name: str, summary: dict, outlet_events=None) -> dict:
                from health_ingest.airflow.tasks import refresh_flat_tables

                return refresh_flat_tables(source_name, summary, outlet_events)

            # after the tables' events: a consumer hears of fhir.<type> first, then of flat.<name>
            refresh_flat_tables.partial(source_name=source.name).expand(summary=announced)

    globals()[source.dag_id] = dag
