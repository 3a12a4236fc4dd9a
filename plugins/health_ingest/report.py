"""Console output made for people: batch summaries and the warehouse status."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: set[int] | None = None) -> str:
    """A plain text table; numeric columns (by index in `right`) are right-aligned with thousands separators."""
    right = right or set()
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=False))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join(text.rstrip() for text in [line(headers), rule, *(line(r) for r in cells)])


def batch_counts_table(counts: Iterable[tuple[str, int, int, int]]) -> str:
    rows = list(counts)
    total = ("total", *(sum(r[i] for r in rows) for i in (1, 2, 3)))
    body = [*rows, total]
    check = [(*r, "ok" if r[1] == r[2] + r[3] else "MISMATCH") for r in body]
    return table(["resource type", "read", "loaded", "quarantined", "read = loaded + quarantined"], check, {1, 2, 3})


def _cell(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)
