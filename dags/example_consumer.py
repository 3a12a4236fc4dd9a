"""Example consumer: runs when a batch's encounters reach the flat tables, and reads exactly the rows of that batch.

It follows the consumer contract: it is scheduled on the Asset of `flat.encounter`, which a source's DAG announces
once the flat tables hold the batch, and reads the batches those events name (`batch_id` in their extra), in
`fhir.encounter` and in `flat.encounter`. Run by hand, it catches up instead: every committed batch after its
watermark (the last `commit_seq` it read, in an Airflow Variable).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Asset, task
from health_ingest.warehouse.consumers import table_asset_uri

WATERMARK = "health_ingest_example_consumer_watermark"

with DAG(
    dag_id="example_consumer",
    description="Reads the encounters of every newly committed batch",
    doc_md=__doc__,
    schedule=Asset(table_asset_uri("flat", "encounter")),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["example", "consumer"],
    default_args={"owner": "analytics", "retries": 1},
):

    @task
    def read_new_encounters(triggering_asset_events=None) -> dict[str, dict[str, int]]:
        from airflow.sdk import Variable
        from health_ingest.warehouse.connection import connect, warehouse_url
        from health_ingest.warehouse.consumers import committed_batches_after, rows_of_batch

        announced = {
            event.extra["batch_id"]: int(event.extra["commit_seq"])
            for events in (triggering_asset_events or {}).values()
            for event in events
            if (event.extra or {}).get("batch_id")
        }
        conn = connect(warehouse_url())
        try:
            if not announced:  # a run by hand: every committed batch after the watermark
                watermark = int(Variable.get(WATERMARK, default="0"))
                announced = {b.batch_id: b.commit_seq for b in committed_batches_after(conn, watermark)}
            read = {
                batch_id: {
                    "fhir.encounter": rows_of_batch(conn, "fhir", "encounter", batch_id),
                    "flat.encounter": rows_of_batch(conn, "flat", "encounter", batch_id),
                }
                for batch_id in announced
            }
        finally:
            conn.close()
        if announced:
            Variable.set(WATERMARK, str(max(int(Variable.get(WATERMARK, default="0")), *announced.values())))
        return read

    read_new_encounters()
