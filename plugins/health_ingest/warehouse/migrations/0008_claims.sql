-- Typed claims tables (created from the format profiles' Table Schemas) and the casts that type them: a value
-- that does not cast becomes NULL here, and its row is quarantined with the column's name.
CREATE SCHEMA IF NOT EXISTS claims;
GRANT USAGE ON SCHEMA claims TO health_ingest_reader;
GRANT USAGE, CREATE ON SCHEMA claims TO health_ingest_loader;

-- Integers as Oracle exports write them too ("40.00"); a real fraction is not an integer.
CREATE FUNCTION ingest.try_bigint(value text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value ~ '^\s*[-+]?[0-9]{1,18}(\.0*)?\s*$' THEN trunc(value::numeric)::bigint END
$$;

-- Numbers, with exponents, and NaN (which PostgreSQL's numeric keeps).
CREATE OR REPLACE FUNCTION ingest.try_numeric(value text) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value ~ '^\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$' THEN value::numeric
                WHEN lower(value) = 'nan' THEN 'NaN'::numeric END
$$;

CREATE FUNCTION ingest.try_boolean(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN lower(value) IN ('true', 't', '1', 'yes', 'y', 'oui', 'o') THEN true
                WHEN lower(value) IN ('false', 'f', '0', 'no', 'n', 'non') THEN false END
$$;

-- A date from its parts, or NULL when there is no such day (31 February): no exception, so no subtransaction per
-- value (the typing step calls these for every date of every row).
CREATE FUNCTION ingest.safe_make_date(y integer, m integer, d integer) RETURNS date
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN y BETWEEN 1 AND 9999 AND m BETWEEN 1 AND 12 AND d BETWEEN 1 AND 31 THEN
        CASE WHEN d <= extract(day FROM make_date(y, m, 1) + interval '1 month' - interval '1 day')
             THEN make_date(y, m, d) END
    END
$$;

CREATE FUNCTION ingest.month_number(name text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_position(ARRAY['jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec'],
                          lower(name))
$$;

-- ISO dates, SAS dates and datetimes (02Jan2007, 02Jan2007:22:12:17), DD-MON-YYYY in any case, YYYYMMDD,
-- DD/MM/YYYY; impossible dates (31 February) are NULL.
CREATE FUNCTION ingest.try_date(value text) RETURNS date
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN value ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}' THEN ingest.safe_make_date(
            substr(value, 1, 4)::integer, substr(value, 6, 2)::integer, substr(value, 9, 2)::integer)
        WHEN value ~* '^[0-9]{2}[a-z]{3}[0-9]{4}' THEN ingest.safe_make_date(
            substr(value, 6, 4)::integer, ingest.month_number(substr(value, 3, 3)), substr(value, 1, 2)::integer)
        WHEN value ~* '^[0-9]{2}-[a-z]{3}-[0-9]{4}$' THEN ingest.safe_make_date(
            substr(value, 8, 4)::integer, ingest.month_number(substr(value, 4, 3)), substr(value, 1, 2)::integer)
        WHEN value ~ '^[0-9]{8}$' THEN ingest.safe_make_date(
            substr(value, 1, 4)::integer, substr(value, 5, 2)::integer, substr(value, 7, 2)::integer)
        WHEN value ~ '^[0-9]{2}/[0-9]{2}/[0-9]{4}$' THEN ingest.safe_make_date(
            substr(value, 7, 4)::integer, substr(value, 4, 2)::integer, substr(value, 1, 2)::integer)
    END
$$;

-- ISO date-times (with a zone, else UTC) and SAS date-times; anything else that is a date is taken at midnight.
CREATE FUNCTION ingest.try_timestamptz_claims(value text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN ingest.try_date(value) IS NULL THEN NULL
        WHEN value ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]+)?)?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?$'
            THEN (CASE WHEN value ~ '(Z|[+-][0-9]{2}(:?[0-9]{2})?)$' THEN value ELSE value || 'Z' END)::timestamptz
        WHEN value ~* '^[0-9]{2}[a-z]{3}[0-9]{4}:([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]$'
            THEN ingest.try_date(value)::timestamp AT TIME ZONE 'UTC'
                 + substr(value, 11, 8)::interval
        ELSE ingest.try_date(value)::timestamp AT TIME ZONE 'UTC'
    END
$$;
