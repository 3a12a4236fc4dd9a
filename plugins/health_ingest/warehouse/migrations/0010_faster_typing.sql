-- Cheaper typing of claims values: the usual shapes take PostgreSQL's own casts, the others the careful ones.

-- Plain integers cast directly; decimals with a zero fraction and padded values keep the numeric route.
CREATE OR REPLACE FUNCTION ingest.try_bigint(value text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value ~ '^-?[0-9]{1,18}$' THEN value::bigint
                WHEN value ~ '^\s*[-+]?[0-9]{1,18}(\.0*)?\s*$' THEN trunc(value::numeric)::bigint END
$$;

-- The days of each month by arithmetic, not by date intervals (this runs for every date of every row).
CREATE OR REPLACE FUNCTION ingest.safe_make_date(y integer, m integer, d integer) RETURNS date
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN y BETWEEN 1 AND 9999 AND m BETWEEN 1 AND 12 AND d BETWEEN 1 AND CASE
                    WHEN m = 2 THEN CASE WHEN y % 4 = 0 AND (y % 100 <> 0 OR y % 400 = 0) THEN 29 ELSE 28 END
                    WHEN m IN (4, 6, 9, 11) THEN 30
                    ELSE 31 END
                THEN make_date(y, m, d) END
$$;
