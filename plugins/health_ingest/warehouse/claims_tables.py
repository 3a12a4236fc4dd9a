"""Typed claims tables `claims.<profile>_<table>`: created from the Table Schemas, loaded from typed chunks (rows of
usual shapes copied straight into typed columns, the others typed from text with casts that quarantine what does not
fit), keyed as the format defines (else by row content, so re-delivery never duplicates). Besides the format's
columns each row has `patient_id` (the person pseudonym), `batch_id`, `ingest_source` and `ingest_row_sha`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from health_ingest.errors import ConfigurationError
from health_ingest.formats.claims import TableSchema
from health_ingest.privacy.claims import ColumnPlan
from health_ingest.warehouse.indexes import build_after_rows, unless_key_twice
from health_ingest.warehouse.staging import STAGING_SCHEMA, TRANSIENT

RESERVED = {"patient_id", "batch_id", "ingest_source", "ingest_row_sha", "file_no", "line_no", "reason", "message"}

# Table Schema type -> (PostgreSQL type, cast from text that returns NULL on failure, what a failure means)
TYPES = {
    "integer": ("bigint", "ingest.try_bigint({}, plain)", "not an integer"),
    "number": ("numeric", "ingest.try_numeric({}, plain)", "not a number"),
    "boolean": ("boolean", "ingest.try_boolean({})", "not a boolean"),
    "date": ("date", "ingest.try_claims_date({})", "not a date (or an impossible one)"),
    "datetime": ("timestamptz", "ingest.try_timestamptz_claims({})", "not a date-time"),
    "year": ("integer", "ingest.try_integer({}, plain)", "not a year"),
}
MAX_ARGUMENTS = 100  # PostgreSQL's limit for one function call
PLAIN_NUMBERS = {"integer", "number", "year"}  # the types whose casts take the row's `plain` test
# the shapes of a value that PostgreSQL's input reads as the careful casts do (`native_row_test`): characters of a
# class, any number of them, or one of some forms; a value may also be empty, but in a key
_ANY_CHARACTER = r"[^\t]"  # of text: the line's tabs part its cells
_NATIVE_CHARACTERS = {"integer": r"[0-9+\- ]", "year": r"[0-9+\- ]", "number": r"[0-9+\-. ]"}
_NATIVE_FORMS = {
    "date": "[0-9]{4}-[0-9]{2}-[0-9]{2}",
    "boolean": "0|1|t|f|T|F|true|false|TRUE|FALSE|y|n|Y|N|yes|no|YES|NO",
    "datetime": "(?!)",  # none: date-times take the careful route
}


def staging_name(batch_id: str, table: str) -> str:
    return f"{STAGING_SCHEMA}.b{batch_id.replace('-', '')[:16]}_claims_{table.lower()}"


def check_columns(table: str, plan: list[ColumnPlan]) -> None:
    clashes = sorted(c.name for c in plan if c.name.lower() in RESERVED)
    if clashes:
        raise ConfigurationError(f"table {table}: columns {clashes} clash with the warehouse's own columns")


def create_staging(cur, name: str, plan: list[ColumnPlan]) -> str:
    """A staging table of text columns (committed at once: another connection types it)."""
    columns = ", ".join(f'"{c.name.lower()}" text' for c in plan)
    cur.execute(
        f"CREATE UNLOGGED TABLE IF NOT EXISTS {name} (file_no integer NOT NULL, line_no bigint NOT NULL, "
        f"patient_id text, reason text, message text, ingest_row_sha text{', ' + columns if columns else ''}) "
        f"{TRANSIENT}"
    )
    return name


def ensure_table(cur, warehouse_table: str, schema: TableSchema, plan: list[ColumnPlan]) -> bool:
    """Create the typed table if it is new (its columns follow the schema and the privacy plan), without its key and
    indexes: `index_table` adds them once the batch has written its rows. Returns whether it was created."""
    from health_ingest.warehouse.merge import must_create_table

    if not must_create_table(cur, f"claims.{warehouse_table}"):
        return False
    kinds = {c.name: c.type for c in schema.columns}
    definitions = [f'"{c.name.lower()}" {_pg_type(c, kinds[c.name])}' for c in plan]
    definitions += [
        "patient_id text",
        "batch_id uuid NOT NULL",
        "ingest_source text NOT NULL",
        "ingest_row_sha text NOT NULL",
    ]
    cur.execute(f"CREATE TABLE claims.{warehouse_table} ({', '.join(definitions)})")
    cur.execute(f"GRANT SELECT ON claims.{warehouse_table} TO health_ingest_reader")
    cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON claims.{warehouse_table} TO health_ingest_loader")
    return True


def index_table(cur, warehouse_table: str, schema: TableSchema, plan: list[ColumnPlan]) -> bool:
    """Give a table that `ensure_table` created its key (the format's, else the row content's) and its `patient_id`
    and `batch_id` indexes. Built after the first batch's rows, each index is one sort, where keeping it up row by
    row costs more than writing the rows. Returns False when a key comes twice: the statement then failed, and the
    caller rolls back to its savepoint, indexes the emptied table and merges by key."""
    columns = _merge_columns(warehouse_table, schema, plan)
    key = f"PRIMARY KEY ({', '.join(columns.key)})" if columns.keyed else "UNIQUE (ingest_source, ingest_row_sha)"
    if not build_after_rows(cur, f"ALTER TABLE claims.{warehouse_table} ADD {key}"):
        return False
    cur.execute(f"CREATE INDEX ON claims.{warehouse_table} (patient_id)")
    cur.execute(f"CREATE INDEX ON claims.{warehouse_table} (batch_id)")
    return True


def create_typed(cur, name: str, schema: TableSchema, plan: list[ColumnPlan]) -> str:
    """A typed chunk (unlogged, committed at once), which the merge and the quarantine read: the staging columns,
    then the format's columns with their warehouse types. Rows that PostgreSQL's own input reads as the careful casts
    would are copied straight into it (`native_row_test`); the others are typed into it from text (`type_staged`)."""
    kinds = {c.name: c.type for c in schema.columns}
    columns = "".join(f', "{c.name.lower()}" {_pg_type(c, kinds[c.name])}' for c in plan)
    cur.execute(
        f"CREATE UNLOGGED TABLE {name} (file_no integer NOT NULL, line_no bigint NOT NULL, patient_id text, "
        f"reason text, message text, ingest_row_sha text{columns}) {TRANSIENT}"
    )
    return name


def native_row_test(schema: TableSchema, plan: list[ColumnPlan]) -> Callable[[str], bool]:
    """Whether a row, its cells (in plan order) joined by tabs, none holding a tab, may be copied straight into typed
    columns: its key is complete, and every typed value is empty or written in a shape that PostgreSQL's own input
    reads exactly as the careful casts do. Integers and years hold only digits, signs and spaces (so no hexadecimal,
    `1_000` or `40.00`); numbers a decimal point too (so no `Infinity`); dates are ISO; booleans one of the common
    spellings; date-times are empty. A value of such a shape that still does not fit (an overflow, 31 February)
    fails the chunk's `COPY`, and the chunk then takes the careful route whole: the test never decides a value, it
    only keeps the shapes that could be read differently away from PostgreSQL's input. One regular expression over
    the line, which costs two thirds of testing the cells type by type."""
    kinds = {c.name: c.type for c in schema.columns}
    fields = []
    for column in plan:
        kind = kinds[column.name] if column.action == "keep" else "string"  # tokens, generalised values: text
        key = column.name in schema.primary_key
        if kind in _NATIVE_FORMS:
            fields.append(f"(?:{_NATIVE_FORMS[kind]}){'' if key else '?'}")
        else:
            fields.append(f"{_NATIVE_CHARACTERS.get(kind, _ANY_CHARACTER)}{'+' if key else '*'}")
    match = re.compile("\t".join(fields)).fullmatch
    return lambda line: match(line) is not None


def type_staged(cur, staged: str, typed: str, schema: TableSchema, plan: list[ColumnPlan]) -> None:
    """One pass over a staged chunk (rows as text) into its typed chunk (`create_typed`): each value cast once to
    its column's type, and the rows with a missing key or a value that does not cast given their reason (naming the
    first such column). Each row's digest comes staged (`privacy.claims.row_digest`).

    Two shortcuts keep this at about one test and one cast per value: a row whose number cells hold no letter and
    no underscore is "plain", and its numbers take PostgreSQL's own casts (migration 0013); and a row is valid when
    it has as many NULLs after the casts as before, so the message naming the failing column is only worked out for
    the rows that fail."""
    kinds = {c.name: c.type for c in schema.columns}
    missing_key = [
        (f"r{index} IS NULL", f"{column.name}: missing, and part of the key")
        for index, column in enumerate(plan)
        if column.name in schema.primary_key
    ]
    numbers = [f'"{c.name.lower()}"' for c in plan if c.action == "keep" and kinds[c.name] in PLAIN_NUMBERS]
    plain = f"{_concat(numbers)} !~ '[_a-zA-Z]'" if numbers else "true"
    inner = ["file_no", "line_no", "patient_id", "reason", "message", "ingest_row_sha"]
    outer, raw, cast_values, failures = [], [], [], []
    for index, column in enumerate(plan):
        name = f'"{column.name.lower()}"'
        cast = _cast(column, kinds[column.name])
        inner.append(f"{name} AS r{index}")
        if cast == name:
            outer.append(f"r{index} AS {name}")
            continue
        inner.append(f"{cast} AS t{index}")
        outer.append(f"t{index} AS {name}")
        raw.append(f"r{index}")
        cast_values.append(f"t{index}")
        failures.append(
            (f"(r{index} IS NOT NULL AND t{index} IS NULL)", f"{column.name}: {TYPES[kinds[column.name]][2]}")
        )
    failing = [test for test, _ in missing_key]
    if raw:
        # a cast turns a value it cannot read into NULL: more NULLs after the casts than before means a failure
        failing.append(f"{_num_nulls(raw)} <> {_num_nulls(cast_values)}")
    if failing:
        fails = " OR ".join(failing)
        named = " ".join(f"WHEN {test} THEN '{message}'" for test, message in [*missing_key, *failures])
        reason = f"coalesce(reason, CASE WHEN {fails} THEN 'invalid_value' END)"
        message = f"coalesce(message, CASE WHEN {fails} THEN CASE {named} END END)"
    else:
        reason, message = "reason", "message"
    query = (
        f"SELECT file_no, line_no, patient_id, {reason} AS reason, "
        f"{message} AS message, ingest_row_sha{''.join(', ' + o for o in outer)} "
        f"FROM (SELECT {', '.join(inner)} FROM (SELECT *, {plain} AS plain FROM {staged} OFFSET 0) s OFFSET 0) raw"
    )
    cur.execute(f"INSERT INTO {typed} {query}")


def insert_chunk(
    cur, typed: str, warehouse_table: str, schema: TableSchema, plan: list[ColumnPlan], batch_id: str, source: str
) -> int | None:
    """Write a typed chunk's good rows into the warehouse table with a plain `INSERT`, which costs a third less than
    an upsert but takes new keys only. Returns the rows written, or None when a key was there already (stored by an
    earlier batch, or met twice in this one): the statement then failed and the caller rolls back to its savepoint
    and merges by key instead (`merge_chunk`)."""
    columns = _merge_columns(warehouse_table, schema, plan)
    if not unless_key_twice(cur, columns.insert(typed), {"batch": batch_id, "source": source}):
        return None
    return cur.rowcount


def merge_chunk(
    cur,
    typed: str,
    offered: int,
    warehouse_table: str,
    schema: TableSchema,
    plan: list[ColumnPlan],
    batch_id: str,
    source: str,
) -> int:
    """Write a typed chunk's good rows (`offered` of them) into the warehouse table, keyed as the format says (else
    by row content), without a savepoint: a long load must not pile up subtransactions. New keys are inserted;
    a key loaded by an earlier batch is updated, the last of its rows in the chunk winning. A key this batch has
    already written (earlier in the chunk or in an earlier chunk) is left alone, so fewer rows are written than
    offered: the caller then merges the whole table at once (`merge_table`), which quarantines all but the last.
    Returns the rows written."""
    columns = _merge_columns(warehouse_table, schema, plan)
    cur.execute(f"{columns.insert(typed)} ON CONFLICT DO NOTHING", {"batch": batch_id, "source": source})
    written = cur.rowcount
    if written < offered:  # some keys were there already: those of earlier batches are updated
        last_first = f"DISTINCT ON ({columns.partition})"
        order = f"ORDER BY {columns.partition}, file_no DESC, line_no DESC"
        cur.execute(
            f"{columns.insert(typed, last_first, order)} {columns.on_conflict_update}",
            {"batch": batch_id, "source": source},
        )
        written += cur.rowcount
    return written


def merge_table(
    cur, typed: str, warehouse_table: str, schema: TableSchema, plan: list[ColumnPlan], batch_id: str, source: str
) -> int:
    """Upsert all the typed rows of a table by key (or by row content); duplicates of a key within them are
    quarantined, the last kept. Returns the rows written."""
    columns = _merge_columns(warehouse_table, schema, plan)
    params = {"batch": batch_id, "source": source}
    upsert = f"{columns.insert(typed)} {columns.on_conflict_update}"
    cur.execute("SAVEPOINT merge_claims")
    try:
        cur.execute(upsert, params)
    except Exception as error:
        if getattr(error, "pgcode", None) != "21000":  # the same key twice in one statement
            raise
        cur.execute("ROLLBACK TO SAVEPOINT merge_claims")
        cur.execute(
            f"""
            UPDATE {typed} s SET reason = 'duplicate_in_batch', message = %(message)s
              FROM (SELECT file_no, line_no, row_number() OVER (PARTITION BY {columns.partition}
                                                             ORDER BY file_no DESC, line_no DESC) AS rank
                      FROM {typed} WHERE reason IS NULL) ranked
             WHERE ranked.rank > 1 AND s.file_no = ranked.file_no AND s.line_no = ranked.line_no
            """,
            {
                "message": "the same key appears again later in this delivery; the last row was loaded"
                if columns.keyed
                else "the same row appears again in this delivery; it was loaded once"
            },
        )
        cur.execute(upsert, params)
    written = cur.rowcount
    cur.execute("RELEASE SAVEPOINT merge_claims")
    return written


def gather_chunks(cur, chunks: list[str], name: str) -> str:
    """The typed chunks of a table as one table (in the load transaction), for a merge of the whole table."""
    cur.execute(
        f"CREATE UNLOGGED TABLE {name} {TRANSIENT} AS " + " UNION ALL ".join(f"SELECT * FROM {c}" for c in chunks)
    )
    return name


def quarantine_rows(cur, staged: str, batch_id: str, names: dict[int, str]) -> None:
    import json

    cur.execute(
        f"""
        INSERT INTO ingest.quarantine (batch_id, file_name, line_number, reason, message)
        SELECT %s, (%s::jsonb ->> file_no::text), line_no, reason, message FROM {staged}
         WHERE reason IS NOT NULL ORDER BY file_no, line_no
        """,
        (batch_id, json.dumps({str(k): v for k, v in names.items()})),
    )


def staged_counts(cur, staged: str) -> dict[int, tuple[int, int]]:
    cur.execute(
        f"SELECT file_no, count(*) FILTER (WHERE reason IS NULL), count(*) FILTER (WHERE reason IS NOT NULL) "
        f"FROM {staged} GROUP BY file_no"
    )
    return {file_no: (good, bad) for file_no, good, bad in cur.fetchall()}


def superseded_counts(cur, staged: str) -> dict[int, int]:
    """Per file, the rows quarantined only because a later row of the delivery has the same key."""
    cur.execute(f"SELECT file_no, count(*) FROM {staged} WHERE reason = 'duplicate_in_batch' GROUP BY file_no")
    return dict(cur.fetchall())


# --- implementation details -------------------------------------------------------------------


class _MergeColumns(NamedTuple):
    warehouse_table: str
    names: list[str]
    key: list[str]

    @property
    def keyed(self) -> bool:
        return bool(self.key)

    @property
    def partition(self) -> str:
        return ", ".join(f'"{k}"' for k in self.key) or "ingest_row_sha"

    def insert(self, typed: str, distinct: str = "", order: str = "") -> str:
        targets = ", ".join([*self.names, "patient_id", "batch_id", "ingest_source", "ingest_row_sha"])
        values = ", ".join([*self.names, "patient_id", "%(batch)s", "%(source)s", "ingest_row_sha"])
        return (
            f"INSERT INTO claims.{self.warehouse_table} AS t ({targets}) "
            f"SELECT {distinct} {values} FROM {typed} WHERE reason IS NULL {order}"
        )

    @property
    def on_conflict_update(self) -> str:
        """Rows of earlier batches are replaced; rows this batch wrote are left alone."""
        conflict = f"({', '.join(self.key)})" if self.key else "(ingest_source, ingest_row_sha)"
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in [*self.names, "patient_id", "batch_id", "ingest_row_sha"])
        return f"ON CONFLICT {conflict} DO UPDATE SET {updates} WHERE t.batch_id <> %(batch)s"


def _merge_columns(warehouse_table: str, schema: TableSchema, plan: list[ColumnPlan]) -> _MergeColumns:
    return _MergeColumns(
        warehouse_table,
        [f'"{c.name.lower()}"' for c in plan],
        [k.lower() for k in schema.primary_key if k in {c.name for c in plan}],
    )


def _concat(values: list[str]) -> str:
    """`concat` of any number of values (a function takes at most 100 arguments)."""
    while len(values) > MAX_ARGUMENTS:
        values = [f"concat({', '.join(values[i : i + MAX_ARGUMENTS])})" for i in range(0, len(values), MAX_ARGUMENTS)]
    return f"concat({', '.join(values)})"


def _num_nulls(values: list[str]) -> str:
    return " + ".join(
        f"num_nulls({', '.join(values[i : i + MAX_ARGUMENTS])})" for i in range(0, len(values), MAX_ARGUMENTS)
    )


def _pg_type(column: ColumnPlan, kind: str) -> str:
    if column.action != "keep":
        return "text"  # tokens and generalised values
    return TYPES[kind][0] if kind in TYPES else "text"


def _cast(column: ColumnPlan, kind: str) -> str:
    name = f'"{column.name.lower()}"'
    if column.action != "keep" or kind not in TYPES:
        return name
    return TYPES[kind][1].format(name)
