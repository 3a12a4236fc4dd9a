"""Data-quality suites (Great Expectations 1.x JSON in `expectations/`), evaluated on a staged batch.

The gate runs inside the load transaction, so it must be fast: each suite becomes one SQL query over the batch's
staging table (joined to the patients, staged or stored, for checks against birth dates), with the semantics of
the Great Expectations expectation types it uses (map expectations ignore nulls and honour `mostly`). The test
suite checks that Great Expectations itself reaches the same verdicts; Great Expectations renders the Data Docs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from health_ingest import config
from health_ingest.warehouse.staging import staging_table

log = logging.getLogger(__name__)

DEFAULT_SUITE = "_default"
MAP_EXPECTATIONS = {
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_be_in_set",
    "expect_column_values_to_not_be_in_set",
    "expect_column_values_to_match_regex",
    "expect_column_values_to_be_between",
    "expect_column_values_to_be_unique",
}
SUPPORTED = MAP_EXPECTATIONS | {"expect_table_row_count_to_be_between"}
_NOT_COUNTED = {"type": "not counted in this part", "kwargs": {}}  # `count_chunk`: counted in the other part
# what a suite column may not mention to be computed on a typed chunk instead of the warehouse table
_CHUNK_UNKNOWN = re.compile(r"\bselect\b|\bbatch_id\b|\bingest_source\b|\bingest_row_sha\b", re.IGNORECASE)


@dataclass(frozen=True)
class SuiteFile:
    """What every suite file holds: its expectations, over columns computed from the rows it checks."""

    name: str
    columns: dict[str, Any]
    expectations: tuple[dict[str, Any], ...]
    path: Path


@dataclass(frozen=True)
class Suite(SuiteFile):
    """A suite over a FHIR resource type's staged rows."""

    resource_type: str
    patient_reference: str | None

    def table_for(self, resource_type: str) -> str:
        return f"fhir.{resource_type.lower()}"


@dataclass
class Outcome:
    """One expectation's result on one batch: what `ingest.dq_results` and the Data Docs show."""

    suite: str
    table: str
    expectation: dict[str, Any]
    success: bool
    observed: dict[str, Any] = field(default_factory=dict)
    downgraded: bool = False  # an error the source's policy records as a warning

    @property
    def category(self) -> str:
        return self.expectation["meta"]["category"]

    @property
    def severity(self) -> str:
        return "warning" if self.downgraded else self.expectation["meta"]["severity"]

    def describe(self) -> str:
        kwargs = self.expectation["kwargs"]
        target = kwargs.get("column", "rows")
        counts = self.observed
        if "unexpected_count" in counts:
            detail = (
                f"{counts['unexpected_count']} of {counts['element_count']} values "
                f"({counts['unexpected_percent']:.1f} %)"
            )
        else:
            detail = f"observed {counts.get('observed_value')}"
        return f"{self.table} {self.expectation['type']}({target}): {detail} [{self.category}, {self.severity}]"


@dataclass(frozen=True)
class TableSuite(SuiteFile):
    """A suite over rows of a warehouse table (claims, flat), read by batch id after the batch's merge.

    `columns` are SQL expressions over the table's row `s`; a column given as `{"sql": ..., "requires": table,
    "otherwise": ...}` falls back to `otherwise` while `requires` does not exist (a header table never loaded)."""

    table: str
    volume_key: str | None


@lru_cache(maxsize=1)
def load_suites(folder: Path | None = None) -> dict[str, Suite]:
    """Suites by resource type ('*' for the default suite that every FHIR table gets)."""
    folder = folder or config.project_root() / "expectations" / "fhir"
    suites = {}
    for path in sorted(folder.glob("*.json")):
        suite = Suite(*_read_suite(path, "resource_type", "patient_reference"))
        suites[suite.resource_type] = suite
    return suites


@lru_cache(maxsize=1)
def load_table_suites(root: Path | None = None) -> TableSuites:
    """Suites of the claims and flat tables (`expectations/claims/<profile>/`, `expectations/flat/`), by table."""
    root = root or config.project_root() / "expectations"
    suites = TableSuites()
    for path in sorted([*root.glob("claims/*/*.json"), *root.glob("flat/*.json")]):
        suite = TableSuite(*_read_suite(path, "table", "volume_key"))
        if yearly := _settings(path).get("yearly"):
            suites.add_yearly(suite, yearly["table"], yearly["volume_key"])
            suite = _of_year(suite, "aa")  # the schema's own name: a file named `T_MCOaaB.csv`
        suites[suite.table] = suite
    return suites


class TableSuites(dict):
    """Suites by warehouse table. The suite of a yearly table's schema (SNDS `claims.snds_t_mcoaab`) also answers
    for each year's table (`claims.snds_t_mco19b`), on that table and its own previous volume."""

    def __init__(self) -> None:
        super().__init__()
        self._yearly: list[tuple[re.Pattern, TableSuite, str]] = []

    def add_yearly(self, suite: TableSuite, table_template: str, volume_template: str) -> None:
        before, _, after = table_template.partition("{year}")
        pattern = re.compile(f"^{re.escape(before)}([0-9]{{2}}){re.escape(after)}$")
        self._yearly.append((pattern, suite, volume_template))

    def get(self, table: str, default: Any = None) -> Any:
        found = super().get(table)
        if found is not None:
            return found
        for pattern, suite, volume_template in self._yearly:
            if match := pattern.match(table):
                year = match.group(1)
                return replace(
                    _of_year(suite, year), name=table, table=table, volume_key=volume_template.format(year=year)
                )
        return default

    def __getitem__(self, table: str) -> TableSuite:
        found = self.get(table)
        if found is None:
            raise KeyError(table)
        return found

    def __contains__(self, table: object) -> bool:
        return isinstance(table, str) and self.get(table) is not None


def _of_year(suite: TableSuite, year: str) -> TableSuite:
    """A yearly suite whose columns read the same year's other tables (a detail's stay header)."""
    columns = json.loads(json.dumps(suite.columns).replace("{year}", year))
    return replace(suite, columns=columns)


def evaluate_tables(
    cur, batch_id: str | None, source: str, tables: list[str], policy, counted: dict[str, list[int]] | None = None
) -> list[Outcome]:
    """The suites of warehouse tables on the rows this batch wrote (inside its transaction, before commit), or on
    every row of the tables when `batch_id` is None (a rebuild). A table in `counted` has its suite's counts summed
    already, chunk by chunk, over the rows the batch wrote (`count_chunk`)."""
    suites = load_table_suites()
    outcomes = []
    for table in tables:
        suite = suites.get(table)
        if suite is None:
            log.warning("no quality suite for %s: add one to expectations/", table)
            continue
        parameters = {"half_of_previous_batch": _half_of_previous(cur, source, suite.volume_key or table)}
        counts = (counted or {}).get(table)
        if counts is None:
            where = "WHERE s.batch_id = %(batch_id)s" if batch_id else ""
            selected = _selected(_resolved(cur, suite.columns))
            with_q = f"WITH q AS (SELECT {selected} FROM {suite.table} s {where} OFFSET 0)"
            counts = _counts(cur, with_q, {"batch_id": batch_id}, suite.expectations)
        found = _outcomes(counts, suite.name, suite.table, suite.expectations, parameters, policy.tolerance)
        outcomes.extend(policy.apply(found))
    return outcomes


def counts_by_chunk(table: str) -> bool:
    """Whether a table's suite can be counted chunk by chunk and summed (`count_chunk`): every column reads its own
    row alone (no subquery, no column that only the warehouse table has) or also another table (a header table,
    given as `requires`), and every expectation counts rows one by one (not uniqueness)."""
    suite = load_table_suites().get(table)
    return (
        suite is not None
        and all(isinstance(c, dict) or not _CHUNK_UNKNOWN.search(c) for c in suite.columns.values())
        and all(e["type"] != "expect_column_values_to_be_unique" for e in suite.expectations)
    )


def count_chunk(cur, table: str, chunk: str, *, other_tables: bool = False) -> list[int]:
    """A table suite's counts over the good rows of a typed chunk of the table: summed over the chunks the batch
    wrote, they are the suite's counts over the batch's rows (`evaluate_tables`). Counted in two parts, whose sum is
    the whole: the rows and the expectations on columns that read the row alone, which any connection can count;
    and (`other_tables`) those on columns that also read another table, which only the load transaction can count
    once it has merged that table. Each part's other expectations count zero."""
    suite = load_table_suites()[table]
    columns = _resolved(cur, {n: c for n, c in suite.columns.items() if isinstance(c, dict) == other_tables})
    counted = [e if e["kwargs"].get("column") in columns else _NOT_COUNTED for e in suite.expectations]
    if other_tables and all(e is _NOT_COUNTED for e in counted):
        return [0] * (1 + 2 * len(counted))
    with_q = f"WITH q AS (SELECT {_selected(columns) or '1'} FROM {chunk} s WHERE s.reason IS NULL OFFSET 0)"
    counts = _counts(cur, with_q, {}, counted)
    return [0, *counts[1:]] if other_tables else counts


def suite_for(resource_type: str) -> Suite:
    suites = load_suites()
    return suites.get(resource_type) or suites["*"]


def evaluate_batch(
    cur,
    batch_id: str,
    source: str,
    resource_types: list[str],
    *,
    tolerance: float = 0.0,
    types_in_batch: list[str] | None = None,
) -> list[Outcome]:
    """The suites of `resource_types` (staged and merged already); `types_in_batch` says whether the batch's own
    patients are staged; `tolerance` lowers `mostly` (0.005 = 0.5 % bad values)."""
    outcomes = []
    for resource_type in resource_types:
        suite = suite_for(resource_type)
        parameters = {"half_of_previous_batch": _half_of_previous(cur, source, resource_type)}
        outcomes.extend(
            _evaluate(cur, suite, batch_id, resource_type, types_in_batch or resource_types, parameters, tolerance)
        )
    return outcomes


def quality_gate(cur, batch_id: str, source, outcomes: list[Outcome], seconds: float) -> None:
    """Before commit: an error of any suite rejects the batch (its evidence is recorded after the rollback);
    warnings are recorded with the batch."""
    from health_ingest.errors import BatchRejected

    if not source.quality.suites:
        log.warning("source %s: quality suites are off by the source's policy", source.name)
        return
    failed_errors = [o for o in outcomes if not o.success and o.severity == "error"]
    warnings = [o for o in outcomes if not o.success and o.severity == "warning"]
    for outcome in warnings:
        log.warning("quality warning: %s", outcome.describe())
    log.info(
        "quality suites: %d expectations on %d tables in %.3f s, %d errors, %d warnings",
        len(outcomes),
        len({o.table for o in outcomes}),
        seconds,
        len(failed_errors),
        len(warnings),
    )
    if failed_errors:
        raise BatchRejected("data quality: " + "; ".join(o.describe() for o in failed_errors), evidence=outcomes)
    record_outcomes(cur, batch_id, outcomes)


def record_outcomes(cur, batch_id: str, outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        kwargs = outcome.expectation["kwargs"]
        cur.execute(
            """
            INSERT INTO ingest.dq_results (batch_id, table_name, expectation, category, severity, success,
                                           observed_value)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            """,
            (
                batch_id,
                outcome.table,
                f"{outcome.expectation['type']}({kwargs.get('column', '')})",
                outcome.category,
                outcome.severity,
                outcome.success,
                json.dumps(
                    {
                        **outcome.observed,
                        "suite": outcome.suite,
                        "kwargs": _plain_kwargs(kwargs),
                        **({"downgraded_by_source_policy": True} if outcome.downgraded else {}),
                    }
                ),
            ),
        )


# --- implementation details -------------------------------------------------------------------


def suite_ctes(cur, suite: Suite, batch_id: str, resource_type: str, types_in_batch: list[str]) -> str:
    """`WITH ... q AS (...)`: one row per good staged record, one column per suite column. Public so that the
    tests can hand the same rows to Great Expectations and compare its verdicts with the gate's."""
    staged = staging_table(batch_id, resource_type)
    columns = ",\n".join(f'({expression}) AS "{name}"' for name, expression in suite.columns.items())
    ctes = []
    join = ""
    if suite.patient_reference:
        ctes.append(_patients(cur, staged, batch_id, types_in_batch))
        join = (
            "LEFT JOIN patients p ON p.id = "
            f"split_part(s.resource #>> '{{{suite.patient_reference},reference}}', '/', 2)"
        )
    # OFFSET 0 keeps q a subquery of its own: each column is computed once per row, not once per aggregate using it
    ctes.append(f"q AS (SELECT {columns}\n FROM {_read_once(staged)} s {join} OFFSET 0)")
    return "WITH " + ", ".join(ctes)


def _patients(cur, staged: str, batch_id: str, types_in_batch: list[str]) -> str:
    """`patients`: the id and birth year of each patient the staged rows belong to, the one staged in this batch,
    else the stored one. Stored patients are looked up by the staged rows' `patient_id` (the pseudonym of the
    patient they refer to), so that a suite does not read every patient of the warehouse. Each birth year is
    computed once per patient, not once per row (a patient's resource is large and stored compressed)."""
    sources = []
    if "Patient" in types_in_batch:
        patients = staging_table(batch_id, "Patient")
        sources.append(f"SELECT 0 AS rank, id, resource FROM {patients} WHERE reason IS NULL")
    cur.execute("SELECT to_regclass('fhir.patient') IS NOT NULL")
    if cur.fetchone()[0]:
        sources.append(
            "SELECT 1 AS rank, id, resource FROM fhir.patient "
            f"WHERE id IN (SELECT patient_id FROM {staged} WHERE reason IS NULL)"
        )
    if not sources:
        sources.append("SELECT 0 AS rank, NULL::text AS id, NULL::jsonb AS resource WHERE false")
    # the birth year of anyone shown as 90 or older is the aggregate's, not theirs: unknown here
    return (
        "patients AS (SELECT DISTINCT ON (id) id, CASE WHEN ingest.year_of(resource->>'birthDate') > "
        "extract(year FROM now())::int - 90 THEN ingest.year_of(resource->>'birthDate') END AS birth_year "
        f"FROM ({' UNION ALL '.join(sources)}) known ORDER BY id, rank)"
    )


def _read_once(staged: str) -> str:
    """The good staged rows, each resource decompressed once for all the suite's expressions (a large resource is
    stored compressed, and every jsonb operator would decompress it again). Concatenating an empty object hands
    back the left operand as read; OFFSET 0 keeps the subquery from being folded into the expressions."""
    return (
        "(SELECT file_no, line_no, id, patient_id, last_updated, resource || '{}'::jsonb AS resource "
        f"FROM {staged} WHERE reason IS NULL OFFSET 0)"
    )


def _evaluate(cur, suite, batch_id, resource_type, types_in_batch, parameters, tolerance) -> list[Outcome]:
    with_q = suite_ctes(cur, suite, batch_id, resource_type, types_in_batch)
    table = suite.table_for(resource_type)
    counts = _counts(cur, with_q, {}, suite.expectations)
    return _outcomes(counts, suite.name, table, suite.expectations, parameters, tolerance)


def _resolved(cur, columns: dict[str, Any]) -> dict[str, str]:
    """A suite's columns, each one that `requires` a table given as its `sql`, or its `otherwise` while the table
    does not exist."""
    resolved = {}
    for name, column in columns.items():
        if isinstance(column, dict):
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (column["requires"],))
            column = column["sql"] if cur.fetchone()[0] else column["otherwise"]
        resolved[name] = column
    return resolved


def _selected(columns: dict[str, str]) -> str:
    """The suite's columns, each computed once per row (q is kept a subquery of its own by OFFSET 0)."""
    return ",\n".join(f'({expression}) AS "{name}"' for name, expression in columns.items())


def _counts(cur, with_q, params, expectations) -> list[int]:
    """One query for the whole suite: the rows, then per expectation its unexpected and element counts."""
    aggregates = [_aggregate(index, expectation, params) for index, expectation in enumerate(expectations)]
    cur.execute(f"{with_q} SELECT count(*), {', '.join(aggregates)} FROM q", params)
    return [int(value) for value in cur.fetchone()]


def _outcomes(counts, suite_name, table, expectations, parameters, tolerance) -> list[Outcome]:
    rows = counts[0]
    outcomes = []
    for index, expectation in enumerate(expectations):
        unexpected, elements = counts[1 + 2 * index], counts[2 + 2 * index]
        outcomes.append(_outcome(suite_name, table, expectation, rows, unexpected, elements, parameters, tolerance))
    return outcomes


def _read_suite(path: Path, target: str, option: str) -> tuple:
    """A suite file, checked (every expectation of a supported type, with its category and severity), as the fields
    of a `SuiteFile` followed by what it checks (`target` of its settings) and its `option`."""
    document = json.loads(path.read_text(encoding="utf-8"))
    for expectation in document["expectations"]:
        if expectation["type"] not in SUPPORTED:
            raise ValueError(f"{path}: expectation type {expectation['type']} is not supported by the gate")
        meta = expectation.get("meta", {})
        if meta.get("category") not in {"conformance", "completeness", "plausibility"} or meta.get("severity") not in {
            "error",
            "warning",
        }:
            raise ValueError(f"{path}: every expectation needs a Kahn category and a severity in its meta")
    settings = _settings(path, document)
    return (
        document["name"],
        settings["columns"],
        tuple(document["expectations"]),
        path,
        settings[target],
        settings.get(option),
    )


def _settings(path: Path, document: dict | None = None) -> dict:
    """The project's own settings of a suite file (`meta.health_ingest`)."""
    document = document if document is not None else json.loads(path.read_text(encoding="utf-8"))
    return document["meta"]["health_ingest"]


def _aggregate(index: int, expectation: dict[str, Any], params: dict[str, Any]) -> str:
    kind, kwargs = expectation["type"], expectation["kwargs"]
    column = f'"{kwargs["column"]}"' if "column" in kwargs else None
    key = f"p{index}"
    if kind in {"expect_table_row_count_to_be_between", _NOT_COUNTED["type"]}:
        return "0, 0"
    if kind == "expect_column_values_to_not_be_null":
        return f"count(*) FILTER (WHERE {column} IS NULL), count(*)"
    if kind == "expect_column_values_to_be_unique":
        return (
            f"(SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM q GROUP BY {column} "
            f"HAVING count(*) > 1 AND {column} IS NOT NULL) duplicated), count({column})"
        )
    if kind in {"expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set"}:
        params[key] = list(kwargs["value_set"])
        test = (
            f"NOT ({column} = ANY(%({key})s))"
            if kind.endswith("be_in_set") and "not_be" not in kind
            else (f"{column} = ANY(%({key})s)")
        )
        return f"count(*) FILTER (WHERE {column} IS NOT NULL AND {test}), count({column})"
    if kind == "expect_column_values_to_match_regex":
        params[key] = kwargs["regex"]
        return f"count(*) FILTER (WHERE {column} IS NOT NULL AND {column}::text !~ %({key})s), count({column})"
    if kind == "expect_column_values_to_be_between":
        tests = []
        if kwargs.get("min_value") is not None:
            params[key + "min"] = kwargs["min_value"]
            tests.append(f"{column} < %({key}min)s")
        if kwargs.get("max_value") is not None:
            params[key + "max"] = kwargs["max_value"]
            tests.append(f"{column} > %({key}max)s")
        return f"count(*) FILTER (WHERE {column} IS NOT NULL AND ({' OR '.join(tests) or 'false'})), count({column})"
    raise ValueError(f"unsupported expectation {kind}")


def _outcome(suite, table, expectation, rows, unexpected, elements, parameters, tolerance) -> Outcome:
    kind, kwargs = expectation["type"], expectation["kwargs"]
    if kind == "expect_table_row_count_to_be_between":
        low = _resolve(kwargs.get("min_value"), parameters)
        high = _resolve(kwargs.get("max_value"), parameters)
        success = (low is None or rows >= low) and (high is None or rows <= high)
        return Outcome(
            suite, table, expectation, success, {"observed_value": rows, "min_value": low, "max_value": high}
        )
    mostly = min(kwargs.get("mostly", 1.0), 1.0 - tolerance)
    percent = 100.0 * unexpected / elements if elements else 0.0
    success = elements == 0 or unexpected <= (1.0 - mostly) * elements + 1e-9
    observed = {"element_count": elements, "unexpected_count": int(unexpected), "unexpected_percent": percent}
    return Outcome(suite, table, expectation, success, observed)


def _resolve(value: Any, parameters: dict[str, Any]) -> Any:
    if isinstance(value, dict) and "$PARAMETER" in value:
        return parameters.get(value["$PARAMETER"])
    return value


def _half_of_previous(cur, source: str, resource_type: str) -> int | None:
    cur.execute(
        """
        SELECT f.rows_loaded FROM ingest.batch_files f JOIN ingest.batches b USING (batch_id)
         WHERE b.source = %s AND b.status = 'committed' AND f.resource_type = %s
         ORDER BY b.commit_seq DESC LIMIT 1
        """,
        (source, resource_type),
    )
    row = cur.fetchone()
    return row[0] // 2 if row else None


def _plain_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "column"}
