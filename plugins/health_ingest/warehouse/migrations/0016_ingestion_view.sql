-- What the Ingestion view in the Airflow UI reads, through the reader role: the batch record (counts, timings,
-- reasons, quality), never a record's values (no quarantine message, no escrow, no raw data); the Airflow task
-- that ran each batch, to link to; and the indexes that keep its pages fast on years of batches.

ALTER TABLE ingest.batches
    ADD COLUMN airflow_dag_id text,
    ADD COLUMN airflow_run_id text,
    ADD COLUMN airflow_task_id text,
    ADD COLUMN airflow_try_number integer,
    ADD COLUMN airflow_map_index integer;

GRANT SELECT (finished_at, hosting, error, step_seconds, rekeyed_from, rekeyed_at, airflow_dag_id, airflow_run_id,
              airflow_task_id, airflow_try_number, airflow_map_index) ON ingest.batches TO health_ingest_reader;
GRANT SELECT (batch_id, file_no, file_name, resource_type, bytes, status, skip_reason, rows_read, rows_loaded,
              rows_quarantined, derived_from) ON ingest.batch_files TO health_ingest_reader;
-- where and why, by reason code; the message may describe a value, so it stays with the loader
GRANT SELECT (batch_id, file_name, reason, quarantined_at) ON ingest.quarantine TO health_ingest_reader;
GRANT SELECT ON ingest.dq_results TO health_ingest_reader;
GRANT SELECT (batch_id, check_name, k, classes, classes_below_k, records_below_k, action, passed)
    ON ingest.privacy_checks TO health_ingest_reader;

-- the last committed batch of a source, and the 30-day charts across sources
CREATE INDEX batches_source_committed ON ingest.batches (source, committed_at DESC) WHERE status = 'committed';
CREATE INDEX batches_started ON ingest.batches (started_at DESC);
CREATE INDEX batches_status_started ON ingest.batches (status, started_at DESC);
-- a batch's quarantine grouped by reason, from the index alone
CREATE INDEX quarantine_batch_reason ON ingest.quarantine (batch_id, reason);
-- a batch's re-identification checks
CREATE INDEX privacy_checks_batch ON ingest.privacy_checks (batch_id);
