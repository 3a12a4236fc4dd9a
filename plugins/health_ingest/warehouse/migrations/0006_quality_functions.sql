-- Casts that return NULL instead of failing, for the quality suites' column expressions: a malformed value is
-- something to report, not a reason for the check itself to crash.
CREATE FUNCTION ingest.year_of(value text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value ~ '^[0-9]{4}' THEN left(value, 4)::integer END
$$;

CREATE FUNCTION ingest.try_timestamptz(value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF value IS NULL OR value !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}' THEN
        RETURN NULL;
    END IF;
    RETURN value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

CREATE FUNCTION ingest.try_numeric(value text) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value ~ '^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$' THEN value::numeric END
$$;

-- Seconds per step of the batch path, for the operator and the benchmark.
ALTER TABLE ingest.batches ADD COLUMN step_seconds jsonb;
