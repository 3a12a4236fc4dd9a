"""Claims ingestion: one DAG per claims source of `sources.yml` (SNDS, Synthea CSV, CMS RIF), a batch per delivery.

Each runs on its schedule and as soon as a delivery's `_READY` marker lands in its inbox (or with `delivery_path`
from the trigger form); the format profile types the files and pseudonymises their identifiers.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task
from health_ingest.orchestration import doc_md, schedule_for, sources_of_kind, tables_alias

for source in sources_of_kind("claims"):
    with DAG(
        dag_id=source.dag_id,
        description=f"Load {source.format} claims deliveries of {source.name} into the warehouse",
        doc_md=doc_md(source),
        schedule=schedule_for(source),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        tags=["claims", source.format, "ingest", *source.tags],
        default_args={"owner": source.owner, "retries": source.retries, "retry_delay": timedelta(minutes=2)},
        params={
            "delivery_path": Param(
                None,
                type=["null", "string"],
                description="A folder of claims files to load now, instead of the inbox's pending deliveries.",
            )
        },
    ) as dag:

        @task
        def find_deliveries(source_name: str, params=None) -> list[str]:
            from health_ingest.orchestration import find_deliveries

            return find_deliveries(source_name, params or {})

        @task(max_active_tis_per_dagrun=1, outlets=[tables_alias(source)])
        def ingest(source_name: str, delivery: str, outlet_events=None) -> dict:
            from health_ingest.orchestration import ingest_delivery

            return ingest_delivery(source_name, delivery, outlet_events)

        ingest.partial(source_name=source.name).expand(delivery=find_deliveries(source.name))

    globals()[source.dag_id] = dag
