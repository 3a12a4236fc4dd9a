-- Staging in its own schema (unlogged tables, one per batch and type) so the quality suites can read a batch
-- before it commits; where each batch's data-quality report is.
CREATE SCHEMA IF NOT EXISTS ingest_staging;
GRANT USAGE, CREATE ON SCHEMA ingest_staging TO health_ingest_loader;
ALTER TABLE ingest.batches ADD COLUMN dq_report text;
