-- The quality suites read FHIR timestamps through `try_timestamptz`, a million times per million resources. On
-- PostgreSQL 16 and later the value is tested without an error to catch (no subtransaction per call), in a SQL
-- function that is inlined into the suite's query. The same values give the same results: NULL unless the value
-- starts with an ISO date and reads as a timestamp.
DO $migration$
BEGIN
    IF current_setting('server_version_num')::integer < 160000 THEN
        RETURN;
    END IF;

    CREATE OR REPLACE FUNCTION ingest.try_timestamptz(value text) RETURNS timestamptz
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN value ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}' AND pg_input_is_valid(value, 'timestamptz')
                    THEN value::timestamptz END
    $$;
END
$migration$;
