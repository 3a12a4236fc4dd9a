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

-- ISO dates, SAS dates and datetimes (02Jan2007, 02Jan2007:22:12:17), DD-MON-YYYY in any case, YYYYMMDD,
-- DD/MM/YYYY; impossible dates (31 February) are NULL.
CREATE FUNCTION ingest.try_date(value text) RETURNS date
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}' THEN RETURN left(value, 10)::date;
    ELSIF value ~* '^[0-9]{2}[a-z]{3}[0-9]{4}' THEN RETURN to_date(left(value, 9), 'DDMonYYYY');
    ELSIF value ~* '^[0-9]{2}-[a-z]{3}-[0-9]{4}$' THEN RETURN to_date(value, 'DD-Mon-YYYY');
    ELSIF value ~ '^[0-9]{8}$' THEN RETURN to_date(value, 'YYYYMMDD');
    ELSIF value ~ '^[0-9]{2}/[0-9]{2}/[0-9]{4}$' THEN RETURN to_date(value, 'DD/MM/YYYY');
    END IF;
    RETURN NULL;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

CREATE FUNCTION ingest.try_timestamptz_claims(value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF value ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}' THEN RETURN value::timestamptz;
    ELSIF value ~* '^[0-9]{2}[a-z]{3}[0-9]{4}:[0-9]{2}:[0-9]{2}:[0-9]{2}$' THEN
        RETURN to_timestamp(value, 'DDMonYYYY:HH24:MI:SS') AT TIME ZONE 'UTC';
    END IF;
    RETURN ingest.try_date(value)::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;
