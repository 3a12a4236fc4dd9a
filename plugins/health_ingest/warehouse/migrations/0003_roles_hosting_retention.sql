-- Roles for the people and services around the warehouse, the hosting decision of each batch, retention.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'health_ingest_loader') THEN
        CREATE ROLE health_ingest_loader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'health_ingest_reader') THEN
        CREATE ROLE health_ingest_reader NOLOGIN;
    END IF;
END
$$;

-- The loader writes what the batch path writes; it can add to the escrow but not read it back.
GRANT USAGE, CREATE ON SCHEMA ingest, fhir TO health_ingest_loader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA ingest, fhir TO health_ingest_loader;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA ingest TO health_ingest_loader;
GRANT USAGE ON SCHEMA escrow TO health_ingest_loader;
GRANT INSERT ON escrow.identifiers TO health_ingest_loader;

-- Readers see pseudonymised data and the committed-batch feed, nothing of the ingestion internals.
GRANT USAGE ON SCHEMA fhir TO health_ingest_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA fhir TO health_ingest_reader;
GRANT USAGE ON SCHEMA ingest TO health_ingest_reader;
GRANT SELECT (batch_id, source, kind, status, started_at, committed_at, commit_seq, rows_read, rows_loaded,
              rows_quarantined, key_id) ON ingest.batches TO health_ingest_reader;

-- Tables made on first use get the same grants.
CREATE OR REPLACE FUNCTION ingest.ensure_fhir_table(resource_type text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    table_name text := lower(resource_type);
BEGIN
    IF resource_type !~ '^[A-Z][A-Za-z]{1,63}$' THEN
        RAISE EXCEPTION 'not a FHIR resource type name: %', resource_type;
    END IF;
    IF to_regclass(format('fhir.%I', table_name)) IS NOT NULL THEN
        RETURN table_name;
    END IF;
    EXECUTE format($ddl$
        CREATE TABLE fhir.%1$I (
            id            text PRIMARY KEY,
            patient_id    text,
            last_updated  timestamptz,
            batch_id      uuid NOT NULL,
            resource      jsonb NOT NULL
        );
        CREATE INDEX %2$I ON fhir.%1$I (patient_id);
        CREATE INDEX %3$I ON fhir.%1$I (batch_id);
        COMMENT ON TABLE fhir.%1$I IS %4$L;
        GRANT SELECT ON fhir.%1$I TO health_ingest_reader;
        GRANT SELECT, INSERT, UPDATE, DELETE ON fhir.%1$I TO health_ingest_loader;
    $ddl$, table_name, table_name || '_patient', table_name || '_batch',
        'Pseudonymised FHIR ' || resource_type || ' resources, one row per resource id');
    RETURN table_name;
END;
$$;

ALTER TABLE ingest.batches ADD COLUMN hosting text;

-- Every purge of raw data (landing files, quarantine records) leaves a trace.
CREATE TABLE ingest.purges (
    purge_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    what         text NOT NULL CHECK (what IN ('landing', 'quarantine')),
    cutoff       timestamptz NOT NULL,
    items        bigint NOT NULL,
    purged_at    timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT ON ingest.purges TO health_ingest_loader;
