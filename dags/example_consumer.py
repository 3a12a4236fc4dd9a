"""Example consumer: runs when a batch's encounters reach the flat tables, and reads exactly the rows of the new
batches.

It follows the consumer contract: it is scheduled on the Asset of `flat.encounter` (announced once the flat tables
are refreshed after a commit), keeps a watermark (the last `commit_seq` it processed) in an Airflow Variable, and
reads each committed batch after it by `batch_id`, in `fhir.encounter` and in `flat.encounter`.
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
    def read_new_encounters() -> dict[str, dict[str, int]]:
        from airflow.sdk import Variable
        from health_ingest.warehouse.connection import connect, warehouse_url
        from health_ingest.warehouse.consumers import committed_batches_after, rows_of_batch

        watermark = int(Variable.get(WATERMARK, default="0"))
        conn = connect(warehouse_url())
        try:
            new = committed_batches_after(conn, watermark)
            read = {
                b.batch_id: {
                    "fhir.encounter": rows_of_batch(conn, "fhir", "encounter", b.batch_id),
                    "flat.encounter": rows_of_batch(conn, "flat", "encounter", b.batch_id),
                }
                for b in new
            }
        finally:
            conn.close()
        if new:
            Variable.set(WATERMARK, str(new[-1].commit_seq))
        return read

    read_new_encounters()
