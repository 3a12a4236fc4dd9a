-- A claims amount of 'NaN' is no amount: it is quarantined as not a number, like any other text, instead of being
-- stored as numeric NaN (which sorts above every number and poisons sums).
CREATE OR REPLACE FUNCTION ingest.try_numeric(value text) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value ~ '^\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$' THEN value::numeric END
$$;

DO $migration$
BEGIN
    IF current_setting('server_version_num')::integer < 160000 THEN
        RETURN;
    END IF;

    CREATE OR REPLACE FUNCTION ingest.try_numeric(value text) RETURNS numeric
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN pg_input_is_valid(value, 'numeric') AND value::numeric::text = value
                         AND abs(value::numeric) < 'Infinity'::numeric THEN value::numeric
                    WHEN value ~ '^\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$' THEN value::numeric END
    $$;
END
$migration$;
