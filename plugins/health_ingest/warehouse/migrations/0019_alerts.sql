-- Alerts sent to operators: one row per event (a batch's outcome, a late run, a source going quiet or coming
-- back), so that each is sent once whichever process or retry sees it. Subjects only; never a record's value.
CREATE TABLE ingest.alerts (
    event_key    text PRIMARY KEY,
    source       text NOT NULL,
    kind         text NOT NULL,
    severity     text NOT NULL CHECK (severity IN ('error', 'warning', 'info')),
    batch_id     uuid,
    subject      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered    text[] NOT NULL DEFAULT '{}',
    undelivered  text[] NOT NULL DEFAULT '{}'
);
CREATE INDEX alerts_source_kind ON ingest.alerts (source, kind, created_at DESC);

-- The step a failed or rejected batch stopped at, said in the operator's words.
ALTER TABLE ingest.batches ADD COLUMN failed_step text;
