"""Claims rows pseudonymised column by column, as the profile's privacy roles say."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from hashlib import md5
from operator import itemgetter

from health_ingest.formats.claims import PrivacyRoles, TableSchema
from health_ingest.privacy.tokens import Tokeniser

YEAR = re.compile(r"(\d{4})")
MONTHS = {
    m: f"{i:02d}"
    for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)
}
NUMBER = re.compile(r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$")
DAY_MONTH_YEAR = re.compile(r"^(\d{2})-?([A-Za-z]{3})-?(\d{4})")


@dataclass(frozen=True)
class ColumnPlan:
    """One kept column: where it is in the file's row, and what happens to it."""

    name: str
    index: int
    action: str  # keep | token | year | year_month | zip3 | number
    system: str = ""


def plan_columns(
    schema: TableSchema, header: list[str], roles: PrivacyRoles, providers: str
) -> tuple[list[ColumnPlan], list[tuple[int, str]]]:
    """Kept columns in schema order, and the (index, system) of the person columns, best first."""
    position = {name: i for i, name in enumerate(header)}
    table = schema.name

    def has(role: frozenset[str] | dict, column: str) -> bool:
        # column names are matched whatever their case (SNDS writes some tables in lower case)
        return any(key in role for key in (column, column.upper(), f"{table}.{column}", f"{table}.{column.upper()}"))

    plan = []
    for column in schema.columns:
        name = column.name
        index = position[name]
        if has(roles.drop, name) or (has(roles.providers, name) and providers == "drop"):
            continue
        if any(re.search(pattern, name.upper()) for pattern in roles.drop_patterns):
            continue
        if has(roles.identifiers, name):
            system = next(
                roles.identifiers[key]
                for key in (f"{table}.{name}", f"{table}.{name.upper()}", name, name.upper())
                if key in roles.identifiers
            )
            plan.append(ColumnPlan(name, index, "token", system))
        elif has(roles.providers, name) and providers == "tokenise":
            plan.append(ColumnPlan(name, index, "token", f"urn:health-ingest:provider:{name.lower()}"))
        elif has(roles.year, name):
            plan.append(ColumnPlan(name, index, "year"))
        elif has(roles.year_month, name):
            plan.append(ColumnPlan(name, index, "year_month"))
        elif has(roles.zip3, name):
            plan.append(ColumnPlan(name, index, "zip3"))
        elif has(roles.numbers_only, name):
            plan.append(ColumnPlan(name, index, "number"))
        else:
            plan.append(ColumnPlan(name, index, "keep"))
    persons = []
    by_upper = {name.upper(): index for name, index in position.items()}
    for key in roles.person:
        column = key.split(".", 1)[1] if "." in key else key
        index = position.get(column, by_upper.get(column.upper()))
        if ("." not in key or key.startswith(f"{table}.")) and index is not None:
            persons.append((index, roles.identifiers.get(key) or roles.identifiers.get(column, "")))
    return plan, persons


class RowTransform:
    """One file's rows pseudonymised as its plan says, every cell picked in one call and the changed ones then
    replaced, each by its column's own cached function (claims repeat their identifiers, years and months from row
    to row). Every cell is text: an empty one is an absent value (staged as NULL)."""

    def __init__(self, plan: list[ColumnPlan], persons: list[tuple[int, str]], tokens: Tokeniser):
        self.columns = plan
        self.changes = [(position, _column_change(c, tokens)) for position, c in enumerate(plan) if c.action != "keep"]
        self.persons = [(index, _token_of(system, tokens)) for index, system in persons]
        indexes = [c.index for c in plan]
        if len(indexes) > 1:
            self._pick = itemgetter(*indexes)
        else:
            self._pick = lambda values: tuple(values[i] for i in indexes)

    def __call__(self, values: list[str]) -> tuple[list[str], str | None]:
        """The row's cells in plan order, and the person pseudonym (None when the row names nobody)."""
        cells: list[str] = list(self._pick(values))
        for position, change in self.changes:
            cells[position] = change(cells[position])
        for index, token in self.persons:
            if values[index]:
                return cells, token(values[index])
        return cells, None


def row_digest(cells: list[str], tab_joined: str | None = None) -> str:
    """The MD5 of the row as PostgreSQL writes `ROW(...)::text`, an empty cell being NULL: rows of a table without
    a key are told apart by it, so it stays what it was when it was taken in SQL. `tab_joined` is the cells joined
    by tabs when none holds a tab (the reader has it already): a row without a comma then needs no second join."""
    text = tab_joined.replace("\t", ",") if tab_joined is not None and "," not in tab_joined else ",".join(cells)
    if text.count(",") != len(cells) - 1 or _record_special(text):
        text = ",".join(map(_record_field, cells))
    return md5(f"({text})".encode()).hexdigest()


def _record_special(text: str) -> bool:
    """Whether PostgreSQL would quote a field holding this text in a record: a quote, a backslash, a parenthesis or
    white space. One substring test per character (each a fast scan) costs a twentieth of a regular expression on
    a long row."""
    return (
        '"' in text
        or "\\" in text
        or "(" in text
        or ")" in text
        or " " in text
        or "\t" in text
        or "\n" in text
        or "\r" in text
        or "\v" in text
        or "\f" in text
    )


def _record_field(cell: str) -> str:
    if cell and not _record_special(cell) and "," not in cell:
        return cell
    if not cell:
        return ""  # NULL
    return '"' + cell.replace("\\", "\\\\").replace('"', '""') + '"'


def _column_change(column: ColumnPlan, tokens: Tokeniser):
    """A column's change as one cached function of the value: an empty value stays empty."""
    if column.action == "token":
        return _token_of(column.system, tokens)

    @lru_cache(maxsize=1 << 12)
    def change(value: str) -> str:
        return (_changed_value(column, value) or "") if value else ""

    return change


def _token_of(system: str, tokens: Tokeniser):
    @lru_cache(maxsize=1 << 14)
    def tokenised(value: str) -> str:
        return tokens.identifier(system, value) if value else ""

    return tokenised


def _changed_value(column: ColumnPlan, value: str) -> str | None:
    """A generalised value (identifiers are tokenised by `_token_of`)."""
    if column.action == "year":
        match = YEAR.search(value)
        return match.group(1) if match else None
    if column.action == "year_month":
        return _year_month(value)
    if column.action == "number":  # a value that is free text (an answer, an address) is not kept
        return value if NUMBER.match(value) else None
    return value[:3]  # zip3


def _year_month(value: str) -> str | None:
    if re.match(r"^\d{4}-\d{2}", value):
        return value[:7]
    match = DAY_MONTH_YEAR.match(value)
    if match and match.group(2).lower() in MONTHS:
        return f"{match.group(3)}-{MONTHS[match.group(2).lower()]}"
    year = YEAR.search(value)
    return year.group(1) if year else None
