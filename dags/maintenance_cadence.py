"""Maintenance: every hour, a source whose last committed batch is older than its `expect_every` (sources file)
sends one alert that it went quiet, and one more when a batch commits again.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, task

with DAG(
    dag_id="maintenance_source_cadence",
    description="Alert when a source stops delivering, and when it delivers again",
    doc_md=__doc__,
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["maintenance", "alerts"],
    default_args={"owner": "operations", "retries": 1},
):

    @task
    def check_quiet_sources() -> dict:
        from health_ingest.airflow.tasks import check_quiet_sources

        return check_quiet_sources()

    check_quiet_sources()
