"""Claims rows pseudonymised column by column, as the profile's privacy roles say.

Every column of a profile's tables has a class (`COLUMN_CLASSES`): identifiers are tokenised or dropped,
quasi-identifiers generalised or kept, codes, amounts and dates kept, free text dropped unless a source keeps it on
purpose; a column no rule classifies is dropped, not kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from hashlib import md5
from operator import itemgetter

from health_ingest.formats.claims import Column, PrivacyRoles, TableSchema
from health_ingest.privacy.tokens import Tokeniser

YEAR = re.compile(r"(\d{4})")
MONTHS = {
    m: f"{i:02d}"
    for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)
}
NUMBER = re.compile(r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$")
DAY_MONTH_YEAR = re.compile(r"^(\d{2})-?([A-Za-z]{3})-?(\d{4})")


# identifier: names a person or a provider (tokenised, or dropped when the profile says nothing of how);
# quasi_identifier: narrows who someone is (generalised when the profile says how, else kept);
# code: a value of a code list, or a technical key of a record that names no one (claim, flow, line numbers);
# amount: a number (money, quantity, count, rate); date: a date or a time; free_text: anything a person typed
COLUMN_CLASSES = ("identifier", "quasi_identifier", "code", "amount", "date", "free_text")
DATE_TYPES = frozenset({"date", "datetime", "year", "yearmonth", "time"})


def classify_column(table: str, column: Column, roles: PrivacyRoles) -> str | None:
    """The class of a column, by the first rule that gives one: its privacy roles (identifiers, providers, drop:
    identifier; year, year_month, zip3: quasi_identifier), the profile's own lists (`classes`), its drop patterns
    (labels and names: free_text), its class patterns (on the upper-case name, free text first), then the schema:
    a date type is a date, a column whose schema names a nomenclature is a code. None: unclassified (dropped)."""
    name = column.name.upper()
    keys = (f"{table}.{column.name}", f"{table}.{name}", column.name, name)
    if any(key in role for key in keys for role in (roles.identifiers, roles.providers, roles.drop, roles.person)):
        return "identifier"
    if any(key in role for key in keys for role in (roles.year, roles.year_month, roles.zip3)):
        return "quasi_identifier"
    for scoped in (keys[:2], keys[2:]):  # a class given for the table's column wins over one given by name
        for class_name in COLUMN_CLASSES:
            if any(key in roles.classes.get(class_name, ()) for key in scoped):
                return class_name
    if any(re.search(pattern, name) for pattern in roles.drop_patterns):
        return "free_text"
    for class_name in ("free_text", *COLUMN_CLASSES):
        if any(re.search(pattern, name) for pattern in roles.class_patterns.get(class_name, ())):
            return class_name
    if column.type in DATE_TYPES:
        return "date"
    if column.coded:
        return "code"
    return None


def unclassified_columns(schema: TableSchema, roles: PrivacyRoles) -> list[str]:
    """The columns of a table no rule classifies: the batch drops them."""
    return [c.name for c in schema.columns if classify_column(schema.name, c, roles) is None]


@dataclass(frozen=True)
class ColumnPlan:
    """One kept column: where it is in the file's row, and what happens to it."""

    name: str
    index: int
    action: str  # keep | token | year | year_month | zip3 | number
    system: str = ""


def plan_columns(
    schema: TableSchema, header: list[str], roles: PrivacyRoles, providers: str, keep_free_text: tuple[str, ...] = ()
) -> tuple[list[ColumnPlan], list[tuple[int, str]]]:
    """Kept columns in schema order, and the (index, system) of the person columns, best first. Free text is
    dropped unless `keep_free_text` names it (`table.COLUMN` or `COLUMN`); unclassified columns are dropped."""
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
        class_name = classify_column(table, column, roles)
        if class_name is None:
            continue
        kept_on_purpose = {name, name.upper(), f"{table}.{name}", f"{table}.{name.upper()}"} & set(keep_free_text)
        # free text goes, unless kept on purpose or only its numbers are kept (the rest is removed value by value)
        if class_name == "free_text" and not kept_on_purpose and not has(roles.numbers_only, name):
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
        elif class_name == "identifier" and not has(roles.providers, name):
            continue  # an identifier the profile does not say how to tokenise
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
