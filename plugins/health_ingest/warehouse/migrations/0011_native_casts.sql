-- Claims values typed by PostgreSQL's own input functions where the server can test a value without an error
-- (PostgreSQL 16 and later): a value takes the native cast when it is valid and is already written the way the
-- type writes it back (so hexadecimal, underscores, 'infinity' or a day-month order never slip through); any other
-- value takes the careful, pattern-guarded route as before. The functions are STABLE so that they are inlined into
-- the typing statement (the test of validity is STABLE); on PostgreSQL 15 only the new `try_integer` is added.

-- Years: integers that fit in 32 bits, so that a long value is quarantined instead of failing the batch.
CREATE FUNCTION ingest.try_integer(value text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value ~ '^\s*[-+]?[0-9]{1,9}(\.0*)?\s*$' THEN trunc(value::numeric)::integer END
$$;

DO $migration$
BEGIN
    IF current_setting('server_version_num')::integer < 160000 THEN
        RETURN;
    END IF;

    CREATE OR REPLACE FUNCTION ingest.try_bigint(value text) RETURNS bigint
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN pg_input_is_valid(value, 'bigint') AND value::bigint::text = value THEN value::bigint
                    WHEN value ~ '^\s*[-+]?[0-9]{1,18}(\.0*)?\s*$' THEN trunc(value::numeric)::bigint END
    $$;

    CREATE OR REPLACE FUNCTION ingest.try_integer(value text) RETURNS integer
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN pg_input_is_valid(value, 'integer') AND value::integer::text = value THEN value::integer
                    WHEN value ~ '^\s*[-+]?[0-9]{1,9}(\.0*)?\s*$' THEN trunc(value::numeric)::integer END
    $$;

    -- NaN is written back as itself and compares above 'Infinity': it takes the careful route, which keeps it.
    CREATE OR REPLACE FUNCTION ingest.try_numeric(value text) RETURNS numeric
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN pg_input_is_valid(value, 'numeric') AND value::numeric::text = value
                         AND abs(value::numeric) < 'Infinity'::numeric THEN value::numeric
                    WHEN value ~ '^\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$' THEN value::numeric
                    WHEN lower(value) = 'nan' THEN 'NaN'::numeric END
    $$;

    -- An ISO date is written back as itself only under the ISO date style; under another the careful route reads it.
    CREATE OR REPLACE FUNCTION ingest.try_claims_date(value text) RETURNS date
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN length(value) = 10 AND pg_input_is_valid(value, 'date') AND value::date::text = value
                    THEN value::date
                    ELSE ingest.try_date(value) END
    $$;
END
$migration$;

-- The same name on every server, so that the typing statement does not depend on the version.
DO $migration$
BEGIN
    IF to_regprocedure('ingest.try_claims_date(text)') IS NULL THEN
        CREATE FUNCTION ingest.try_claims_date(value text) RETURNS date
        LANGUAGE sql IMMUTABLE AS $$ SELECT ingest.try_date(value) $$;
    END IF;
END
$migration$;
