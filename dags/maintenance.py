"""Maintenance: purge raw data (landing copies, quarantine records) past its retention time, every night.

The retention is `HEALTH_INGEST_RETENTION_DAYS` (30 by default); each purge is recorded in `ingest.purges`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, task

with DAG(
    dag_id="maintenance_retention",
    description="Purge landing files and quarantine records past their retention",
    doc_md=__doc__,
    schedule="30 3 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["maintenance", "privacy"],
    default_args={"owner": "operations", "retries": 2},
):

    @task
    def purge_raw_data() -> dict:
        from health_ingest.airflow.tasks import purge_raw_data

        return purge_raw_data()

    purge_raw_data()
