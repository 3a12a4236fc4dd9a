-- The ingestion contract: batches, their files, quarantine, data-quality results, FHIR tables.

CREATE SCHEMA IF NOT EXISTS ingest;
CREATE SCHEMA IF NOT EXISTS fhir;

CREATE SEQUENCE ingest.commit_seq;

CREATE TABLE ingest.batches (
    batch_id          uuid PRIMARY KEY,
    source            text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('fhir', 'claims')),
    status            text NOT NULL CHECK (status IN ('loading', 'committed', 'rejected', 'failed')),
    started_at        timestamptz NOT NULL DEFAULT now(),
    committed_at      timestamptz,
    finished_at       timestamptz,
    -- consumers read committed batches with commit_seq above their watermark; commits are serialised,
    -- so commit_seq order is commit order
    commit_seq        bigint UNIQUE,
    rows_read         bigint NOT NULL DEFAULT 0,
    rows_loaded       bigint NOT NULL DEFAULT 0,
    rows_quarantined  bigint NOT NULL DEFAULT 0,
    key_id            text NOT NULL,
    input_sha256      text,
    delivery          text,
    error             text,
    CONSTRAINT counts_reconcile CHECK (status <> 'committed' OR rows_read = rows_loaded + rows_quarantined),
    CONSTRAINT committed_has_seq CHECK (status <> 'committed' OR commit_seq IS NOT NULL)
);
CREATE INDEX batches_source_started ON ingest.batches (source, started_at DESC);

CREATE TABLE ingest.batch_files (
    batch_id          uuid NOT NULL REFERENCES ingest.batches ON DELETE CASCADE,
    file_no           integer NOT NULL,
    file_name         text NOT NULL,
    resource_type     text,
    bytes             bigint NOT NULL,
    sha256            text NOT NULL,
    status            text NOT NULL CHECK (status IN ('loaded', 'skipped')),
    skip_reason       text,
    rows_read         bigint NOT NULL DEFAULT 0,
    rows_loaded       bigint NOT NULL DEFAULT 0,
    rows_quarantined  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, file_no)
);

-- Where each rejected record was and why; never its values (raw records stay in the landing zone).
CREATE TABLE ingest.quarantine (
    quarantine_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id          uuid NOT NULL REFERENCES ingest.batches ON DELETE CASCADE,
    file_name         text NOT NULL,
    line_number       bigint NOT NULL,
    reason            text NOT NULL,
    message           text NOT NULL,
    quarantined_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quarantine_batch ON ingest.quarantine (batch_id);

CREATE TABLE ingest.dq_results (
    result_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id          uuid NOT NULL REFERENCES ingest.batches ON DELETE CASCADE,
    table_name        text NOT NULL,
    expectation       text NOT NULL,
    category          text NOT NULL CHECK (category IN ('conformance', 'completeness', 'plausibility')),
    severity          text NOT NULL CHECK (severity IN ('error', 'warning')),
    success           boolean NOT NULL,
    observed_value    jsonb,
    checked_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dq_results_batch ON ingest.dq_results (batch_id);

-- One table per resource type, all of one shape; created on first use from this template so the
-- shape stays versioned here rather than in code.
CREATE FUNCTION ingest.ensure_fhir_table(resource_type text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    table_name text := lower(resource_type);
BEGIN
    IF resource_type !~ '^[A-Z][A-Za-z]{1,63}$' THEN
        RAISE EXCEPTION 'not a FHIR resource type name: %', resource_type;
    END IF;
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS fhir.%1$I (
            id            text PRIMARY KEY,
            patient_id    text,
            last_updated  timestamptz,
            batch_id      uuid NOT NULL,
            resource      jsonb NOT NULL
        );
        CREATE INDEX IF NOT EXISTS %2$I ON fhir.%1$I (patient_id);
        CREATE INDEX IF NOT EXISTS %3$I ON fhir.%1$I (batch_id);
        COMMENT ON TABLE fhir.%1$I IS %4$L;
    $ddl$, table_name, table_name || '_patient', table_name || '_batch',
        'Pseudonymised FHIR ' || resource_type || ' resources, one row per resource id');
    RETURN table_name;
END;
$$;
