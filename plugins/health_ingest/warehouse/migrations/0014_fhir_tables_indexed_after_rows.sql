-- A FHIR table that a batch creates gets its key and indexes after that batch's rows: each is then built by one sort,
-- where keeping three indexes up row by row costs more than writing the rows. `ensure_fhir_table` keeps its contract
-- (a table made on first use is whole at once) and is made of the two steps.

-- The table without its key and indexes, or NULL when it exists already.
CREATE FUNCTION ingest.create_unindexed_fhir_table(resource_type text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    table_name text := lower(resource_type);
BEGIN
    IF resource_type !~ '^[A-Z][A-Za-z]{1,63}$' THEN
        RAISE EXCEPTION 'not a FHIR resource type name: %', resource_type;
    END IF;
    IF to_regclass(format('fhir.%I', table_name)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format($ddl$
        CREATE TABLE fhir.%1$I (
            id            text NOT NULL,
            patient_id    text,
            last_updated  timestamptz,
            batch_id      uuid NOT NULL,
            resource      jsonb NOT NULL
        );
        COMMENT ON TABLE fhir.%1$I IS %2$L;
        GRANT SELECT ON fhir.%1$I TO health_ingest_reader;
        GRANT SELECT, INSERT, UPDATE, DELETE ON fhir.%1$I TO health_ingest_loader;
    $ddl$, table_name, 'Pseudonymised FHIR ' || resource_type || ' resources, one row per resource id');
    RETURN table_name;
END;
$$;

-- The key and indexes of a table made by `create_unindexed_fhir_table`, named as they always were. An id present
-- twice fails the key (unique_violation): the caller then rolls the table back and merges by the upsert rules.
CREATE FUNCTION ingest.index_fhir_table(table_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format($ddl$
        ALTER TABLE fhir.%1$I ADD CONSTRAINT %2$I PRIMARY KEY (id);
        CREATE INDEX %3$I ON fhir.%1$I (patient_id);
        CREATE INDEX %4$I ON fhir.%1$I (batch_id);
    $ddl$, table_name, table_name || '_pkey', table_name || '_patient', table_name || '_batch');
END;
$$;

CREATE OR REPLACE FUNCTION ingest.ensure_fhir_table(resource_type text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    created text := ingest.create_unindexed_fhir_table(resource_type);
BEGIN
    IF created IS NOT NULL THEN
        PERFORM ingest.index_fhir_table(created);
    END IF;
    RETURN lower(resource_type);
END;
$$;
