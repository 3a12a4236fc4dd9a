-- Claims numbers typed at the cost of one test and one cast: the typing statement tells each value whether its row's
-- number cells hold no letter and no underscore ("plain"). PostgreSQL's own input functions then read such a value
-- exactly as the careful route would (a sign, digits, a decimal point, white space), so a value they accept takes
-- the native cast; any other value, and every value on PostgreSQL 15, takes the careful route as before.
CREATE FUNCTION ingest.try_bigint(value text, plain boolean) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT ingest.try_bigint(value) $$;

CREATE FUNCTION ingest.try_integer(value text, plain boolean) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT ingest.try_integer(value) $$;

CREATE FUNCTION ingest.try_numeric(value text, plain boolean) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$ SELECT ingest.try_numeric(value) $$;

DO $migration$
BEGIN
    IF current_setting('server_version_num')::integer < 160000 THEN
        RETURN;
    END IF;

    CREATE OR REPLACE FUNCTION ingest.try_bigint(value text, plain boolean) RETURNS bigint
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN plain AND pg_input_is_valid(value, 'bigint') THEN value::bigint
                    ELSE ingest.try_bigint(value) END
    $$;

    CREATE OR REPLACE FUNCTION ingest.try_integer(value text, plain boolean) RETURNS integer
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN plain AND pg_input_is_valid(value, 'integer') THEN value::integer
                    ELSE ingest.try_integer(value) END
    $$;

    CREATE OR REPLACE FUNCTION ingest.try_numeric(value text, plain boolean) RETURNS numeric
    LANGUAGE sql STABLE AS $$
        SELECT CASE WHEN plain AND pg_input_is_valid(value, 'numeric') THEN value::numeric
                    ELSE ingest.try_numeric(value) END
    $$;
END
$migration$;
