"""Run one SQL-on-FHIR v2 ViewDefinition over resources: validate it once, compile each FHIRPath once.

Semantics follow the specification: `select` structures are cross-joined; `forEach`, `forEachOrNull` and
`repeat` move the focus; `unionAll` concatenates; `where` keeps a resource only when every path is `true`;
constants are `%name`; `%rowIndex` is the index of the focus in its iteration.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from decimal import Decimal
from functools import lru_cache
from typing import Any

from health_ingest.errors import ViewDefinitionError

COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
SELECT_KEYS = {"column", "select", "forEach", "forEachOrNull", "repeat", "unionAll"}


class ViewRunner:
    def __init__(self, view: dict[str, Any]) -> None:
        if not isinstance(view, dict) or not isinstance(view.get("resource"), str) or not view["resource"]:
            raise ViewDefinitionError("a ViewDefinition needs a 'resource' type")
        self.view = view
        self.resource_type: str = view["resource"]
        self.constants = {c["name"]: _constant_value(c) for c in view.get("constant", [])}
        self.where = [_compile(w["path"]) for w in view.get("where", [])]
        selects = view.get("select")
        if not isinstance(selects, list) or not selects:
            raise ViewDefinitionError("a ViewDefinition needs a non-empty 'select'")
        self.selects = [_Select(s) for s in selects]
        self.columns = _columns_of(self.selects)
        names = [c["name"] for c in self.columns]
        if len(names) != len(set(names)):
            raise ViewDefinitionError(f"column names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")

    def rows(self, resource: dict[str, Any]) -> list[dict[str, Any]]:
        if resource.get("resourceType") != self.resource_type:
            return []
        context = {**self.constants, "rowIndex": 0}
        for where in self.where:
            result = where(resource, context)
            if result and not all(isinstance(v, bool) for v in result):
                raise ViewDefinitionError("a 'where' path must return a boolean")
            if result != [True]:
                return []
        rows: list[dict[str, Any]] = [{}]
        for select in self.selects:
            rows = [{**left, **right} for left in rows for right in select.rows(resource, context)]
        return rows

    def run(self, resources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for resource in resources:
            yield from self.rows(resource)


# --- implementation details -------------------------------------------------------------------


class _Select:
    def __init__(self, node: dict[str, Any]) -> None:
        if not isinstance(node, dict) or not set(node) & SELECT_KEYS:
            raise ViewDefinitionError("a select needs column, select, forEach, forEachOrNull, repeat or unionAll")
        focus_keys = [k for k in ("forEach", "forEachOrNull", "repeat") if k in node]
        if len(focus_keys) > 1:
            raise ViewDefinitionError(f"a select may have one of forEach, forEachOrNull, repeat, not {focus_keys}")
        self.mode = focus_keys[0] if focus_keys else None
        if self.mode == "repeat":
            paths = node["repeat"]
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ViewDefinitionError("'repeat' must be a list of paths")
            self.focus = [_compile(p, nodes=True) for p in paths]
        elif self.mode:
            if not isinstance(node[self.mode], str):
                raise ViewDefinitionError(f"'{self.mode}' must be a FHIRPath string")
            self.focus = [_compile(node[self.mode], nodes=True)]
        self.columns = []
        for column in node.get("column", []):
            name = column.get("name")
            if not isinstance(name, str) or not COLUMN_NAME.match(name):
                raise ViewDefinitionError(f"invalid column name {name!r}")
            if not isinstance(column.get("path"), str):
                raise ViewDefinitionError(f"column {name} needs a path")
            self.columns.append((column, _compile(column["path"])))
        self.selects = [_Select(s) for s in node.get("select", [])]
        self.unions = [_Select(s) for s in node.get("unionAll", [])]
        if self.unions:
            shapes = {tuple(c["name"] for c in _columns_of([u])) for u in self.unions}
            if len(shapes) > 1:
                raise ViewDefinitionError("every unionAll branch must have the same columns, in the same order")

    def rows(self, node: Any, context: dict[str, Any]) -> list[dict[str, Any]]:
        if self.mode is None:
            return self._rows_at(node, context)
        items = self._repeat(node, context) if self.mode == "repeat" else self.focus[0](node, context)
        rows = []
        for index, item in enumerate(items):
            rows.extend(self._rows_at(item, {**context, "rowIndex": index}))
        if not items and self.mode == "forEachOrNull":
            rows.extend(self._rows_at(_NOTHING, {**context, "rowIndex": 0}))
        return rows

    def _rows_at(self, node: Any, context: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows for one focus; with `_NOTHING` (an empty forEachOrNull) nested selects give one null row."""
        own = {}
        for column, path in self.columns:
            values = [_plain(v) for v in path(node, context)]
            if column.get("collection"):
                own[column["name"]] = values
            elif len(values) > 1:
                raise ViewDefinitionError(f"column {column['name']} returned {len(values)} values; not a collection")
            else:
                own[column["name"]] = values[0] if values else None
        rows = [own]
        if node is _NOTHING:
            nested = _columns_of(self.selects) + (_columns_of([self.unions[0]]) if self.unions else [])
            return [{**own, **dict.fromkeys((c["name"] for c in nested), None)}]
        for select in self.selects:
            rows = [{**left, **right} for left in rows for right in select.rows(node, context)]
        if self.unions:
            union_rows = [row for union in self.unions for row in union.rows(node, context)]
            rows = [{**left, **right} for left in rows for right in union_rows]
        return rows

    def _repeat(self, node: Any, context: dict[str, Any]) -> list[Any]:
        found = []

        def walk(current: Any) -> None:
            for path in self.focus:
                for child in path(current, context):
                    found.append(child)
                    walk(child)

        walk(node)
        return found


def _columns_of(selects: list[_Select]) -> list[dict[str, Any]]:
    columns = []
    for select in selects:
        columns.extend(column for column, _ in select.columns)
        columns.extend(_columns_of(select.selects))
        if select.unions:
            columns.extend(_columns_of([select.unions[0]]))
    return columns


def _constant_value(constant: dict[str, Any]) -> Any:
    name = constant.get("name")
    if not isinstance(name, str) or not COLUMN_NAME.match(name):
        raise ViewDefinitionError(f"invalid constant name {name!r}")
    values = [v for k, v in constant.items() if k.startswith("value")]
    if len(values) != 1:
        raise ViewDefinitionError(f"constant {name} needs exactly one value[x]")
    return values[0]


_NOTHING: list = []  # the focus of an empty forEachOrNull: every path on it is empty


@lru_cache(maxsize=4096)
def _compile(path: str, nodes: bool = False):
    """Compiled once per distinct path: re-parsing a path for every resource is many times slower.

    With `nodes`, results stay FHIRPath nodes that know their element type, so that paths evaluated on them
    later resolve choice elements (`value.ofType(string)`).
    """
    import fhirpathpy
    from fhirpathpy.models import models

    if not isinstance(path, str) or not path.strip():
        raise ViewDefinitionError("an empty FHIRPath")
    if path.strip() == "$this":
        return lambda node, context: list(node) if isinstance(node, list) else [node]
    options = {"userInvocationTable": _FUNCTIONS, "returnRawData": nodes}
    try:
        compiled = fhirpathpy.compile(path, models["r4"], options=options)
    except Exception as error:
        raise ViewDefinitionError(f"invalid FHIRPath {path!r}: {error}") from None

    def evaluate(node: Any, context: dict[str, Any]) -> list[Any]:
        try:
            return compiled(node, context)
        except ViewDefinitionError:
            raise
        except Exception as error:
            raise ViewDefinitionError(f"FHIRPath {path!r} failed: {error}") from None

    return evaluate


def _resource_key(inputs: list[Any]) -> list[str]:
    return [r["id"] for r in inputs if isinstance(r, dict) and "id" in r]


def _reference_key(inputs: list[Any], resource_type: Any = None) -> list[str]:
    wanted = getattr(resource_type, "name", resource_type)
    keys = []
    for reference in inputs:
        value = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(value, str) or "/" not in value:
            continue
        kind, _, key = value.rstrip("/").rpartition("/")
        kind = kind.rpartition("/")[2]
        if wanted is None or kind == str(wanted).rpartition(".")[2]:
            keys.append(key)
    return keys


def _join(inputs: list[Any], separator: str = "") -> list[str]:
    """join() of an empty collection is the empty string, not empty (FHIRPath 3.0)."""
    return [(separator or "").join(str(v) for v in inputs)]


_FUNCTIONS = {
    "join": {"fn": _join, "arity": {0: [], 1: ["String"]}},
    "getResourceKey": {"fn": _resource_key, "arity": {0: []}},
    "getReferenceKey": {"fn": _reference_key, "arity": {0: [], 1: ["TypeSpecifier"]}},
}


def _plain(value: Any) -> Any:
    """FHIRPath values as JSON values: decimals become int or float, dates and quantities their text."""
    from fhirpathpy.engine.util import get_data

    value = get_data(value)
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict | list):
        return value
    return str(value)
