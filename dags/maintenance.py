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
        from datetime import timedelta

        from health_ingest.warehouse.connection import connect, warehouse_url
        from health_ingest.warehouse.retention import purge_raw_data, retention_days

        conn = connect(warehouse_url())
        try:
            report = purge_raw_data(conn, older_than=timedelta(days=retention_days()))
        finally:
            conn.close()
        return {"landing_folders": report.landing_folders, "quarantine_records": report.quarantine_records}

    purge_raw_data()
