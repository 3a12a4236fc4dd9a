"""Deliveries announced on the message queue: each message names a source and its delivery's folder.

Senders publish `{"source": "<name>", "delivery": "<folder>"}` on the Redis channel `health_ingest.deliveries`
(`HEALTH_INGEST_DELIVERY_CHANNEL`; the Redis is the connection `health_ingest_queue`). The triggerer listens
(Airflow's `MessageQueueTrigger` through an `AssetWatcher`), and this DAG starts the named source's DAG with the
folder as its `delivery_path`. A message that names an undeclared source, or a folder outside the source's
`allowed_roots`, is refused and logged here, and nothing is loaded; the source's DAG checks the folder again.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, task
from health_ingest.airflow.schedules import delivery_messages_asset

with DAG(
    dag_id="delivery_messages",
    description="Starts the named source's DAG for each delivery announced on the message queue",
    doc_md=__doc__,
    schedule=[delivery_messages_asset()],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["ingest", "messages"],
    default_args={"owner": "data-engineering", "retries": 1},
):

    @task
    def route_messages(triggering_asset_events=None) -> list[dict]:
        from health_ingest.airflow.tasks import route_delivery_messages

        return route_delivery_messages(triggering_asset_events)

    # one run id per message: a retry finds the run it started and does not load the delivery twice
    TriggerDagRunOperator.partial(
        task_id="start_ingest",
        trigger_run_id="delivery_message__{{ run_id }}__{{ ti.map_index }}",
        skip_when_already_exists=True,
        map_index_template="{{ task.trigger_dag_id }}",
    ).expand_kwargs(route_messages())
