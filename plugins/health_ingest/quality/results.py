"""How one recorded expectation result reads to a person: what was expected (parameters as evaluated for the
batch, never `{'$PARAMETER': ...}`) and what was observed. The Data Docs of the CLI and of the Airflow UI share it."""

from __future__ import annotations

from typing import Any

KAHN_CATEGORIES = ("conformance", "completeness", "plausibility")
EVALUATED_BOUNDS = ("min_value", "max_value")  # a volume expectation records its bounds as evaluated


def evaluated_kwargs(observed: dict[str, Any]) -> dict[str, Any]:
    """The expectation's arguments with every `$PARAMETER` replaced by the value it had for this batch (None when
    it had none, as for a source's first batch: no bound was checked)."""
    kwargs = dict(observed.get("kwargs") or {})
    for name, value in kwargs.items():
        if isinstance(value, dict) and "$PARAMETER" in value:
            kwargs[name] = observed.get(name) if name in EVALUATED_BOUNDS else None
    return kwargs


def parameter_names(observed: dict[str, Any]) -> dict[str, str]:
    """Argument -> the name of the parameter it was evaluated from (`half_of_previous_batch`)."""
    return {
        name: value["$PARAMETER"]
        for name, value in (observed.get("kwargs") or {}).items()
        if isinstance(value, dict) and "$PARAMETER" in value
    }


def split_expectation(expectation: str) -> tuple[str, str]:
    """`expect_column_values_to_not_be_null(id)` -> (type, column); the column is '' for table expectations."""
    kind, _, column = expectation.partition("(")
    return kind, column.rstrip(")")


def expected_text(expectation: str, observed: dict[str, Any]) -> str:
    kind, column = split_expectation(expectation)
    kwargs = evaluated_kwargs(observed)
    names = parameter_names(observed)
    words = kind.removeprefix("expect_").replace("_", " ")
    parts = []
    for name, value in kwargs.items():
        if name in {"result_format", "catch_exceptions", "meta"}:
            continue
        shown = "none" if value is None else _short(value)
        if name in names:
            shown += f" ({names[name]})"
        parts.append(f"{name.replace('_', ' ')} {shown}")
    target = f"{column}: " if column else ""
    return f"{target}{words}" + (f" ({', '.join(parts)})" if parts else "")


def observed_text(observed: dict[str, Any]) -> str:
    if "unexpected_count" in observed:
        count, total = observed.get("unexpected_count", 0), observed.get("element_count", 0)
        percent = observed.get("unexpected_percent") or 0.0
        return f"{count:,} of {total:,} values unexpected ({percent:.2f} %)"
    if "observed_value" in observed:
        return f"observed {_short(observed['observed_value'])}"
    return "not counted"


def _short(value: Any, limit: int = 8) -> str:
    if isinstance(value, list | tuple | set):
        items = [str(v) for v in list(value)[:limit]]
        more = f", ... ({len(value) - limit} more)" if len(value) > limit else ""
        return "[" + ", ".join(items) + more + "]"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
