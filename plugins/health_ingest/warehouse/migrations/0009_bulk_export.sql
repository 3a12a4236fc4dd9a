-- FHIR Bulk Data sources: where each source's export stands, and what an export's deleted[] and error[] said.

-- One row per pulled source. `since` moves to an export's transactionTime only in the transaction that commits
-- its batch; the export_* columns describe an export kicked off and not yet committed, so a crashed or
-- restarted run polls the same export again instead of starting a new one.
CREATE TABLE ingest.source_state (
    source                  text PRIMARY KEY,
    since                   timestamptz,
    since_batch_id          uuid,
    export_status_url       text,
    export_request          text,
    export_kicked_off_at    timestamptz,
    export_full_refresh     boolean,
    export_progress         text,
    export_transaction_time timestamptz,
    export_expires_at       timestamptz,
    export_delivery         text,
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- Resources an export listed as deleted, by pseudonymised id: consumers read them by batch like the rows.
CREATE TABLE ingest.deletions (
    batch_id       uuid NOT NULL REFERENCES ingest.batches ON DELETE CASCADE,
    resource_type  text NOT NULL,
    id             text NOT NULL,
    found          boolean NOT NULL,
    PRIMARY KEY (batch_id, resource_type, id)
);
GRANT SELECT ON ingest.deletions TO health_ingest_reader;

-- The OperationOutcomes of an export's error[] files, counted by severity and code (their text may name a
-- patient: it stays in the landing zone with the files).
CREATE TABLE ingest.export_errors (
    batch_id   uuid NOT NULL REFERENCES ingest.batches ON DELETE CASCADE,
    file_name  text NOT NULL,
    severity   text NOT NULL,
    code       text NOT NULL,
    issues     bigint NOT NULL,
    PRIMARY KEY (batch_id, file_name, severity, code)
);

ALTER TABLE ingest.batches ADD COLUMN rows_deleted bigint NOT NULL DEFAULT 0;

ALTER TABLE ingest.batch_files DROP CONSTRAINT batch_files_status_check;
ALTER TABLE ingest.batch_files ADD CONSTRAINT batch_files_status_check
    CHECK (status IN ('loaded', 'skipped', 'unpacked', 'deletions', 'errors'));
GRANT SELECT (rows_deleted) ON ingest.batches TO health_ingest_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ingest.source_state, ingest.deletions, ingest.export_errors
    TO health_ingest_loader;
