"""Claims rows pseudonymised column by column, as the profile's privacy roles say."""

from __future__ import annotations

import re
from dataclasses import dataclass

from health_ingest.formats.claims import PrivacyRoles, TableSchema
from health_ingest.privacy.tokens import Tokeniser

YEAR = re.compile(r"(\d{4})")
MONTHS = {
    m: f"{i:02d}"
    for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)
}
DAY_MONTH_YEAR = re.compile(r"^(\d{2})-?([A-Za-z]{3})-?(\d{4})")


@dataclass(frozen=True)
class ColumnPlan:
    """One kept column: where it is in the file's row, and what happens to it."""

    name: str
    index: int
    action: str  # keep | token | year | year_month | zip3
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


def transform_row(values: list[str], plan: list[ColumnPlan], persons, tokens: Tokeniser) -> tuple[list, str | None]:
    """The row's kept values, pseudonymised, and the person pseudonym (None when the row names nobody)."""
    out: list[str | None] = []
    for column in plan:
        value = values[column.index]
        if value == "":
            out.append(None)
        elif column.action == "keep":
            out.append(value)
        elif column.action == "token":
            out.append(tokens.identifier(column.system, value))
        elif column.action == "year":
            match = YEAR.search(value)
            out.append(match.group(1) if match else None)
        elif column.action == "year_month":
            out.append(_year_month(value))
        else:  # zip3
            out.append(value[:3])
    person = None
    for index, system in persons:
        if values[index]:
            person = tokens.identifier(system, values[index])
            break
    return out, person


def _year_month(value: str) -> str | None:
    if re.match(r"^\d{4}-\d{2}", value):
        return value[:7]
    match = DAY_MONTH_YEAR.match(value)
    if match and match.group(2).lower() in MONTHS:
        return f"{match.group(3)}-{MONTHS[match.group(2).lower()]}"
    year = YEAR.search(value)
    return year.group(1) if year else None
