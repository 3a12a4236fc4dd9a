"""JSON numbers kept as written: `orjson` reads every number with a fraction or an exponent, and integers beyond 64
bits, as binary floats, which drops a FHIR decimal's written precision (`1.50`) and rounds long values. The lines
whose numbers would not survive that are parsed again exactly; the others (nearly all) keep the fast parser.

Two marks find them at little cost: a number written with a fraction is found in the raw bytes from its literal
point (`inexact_lines`), and any float of 1e16 or more (an integer beyond 64 bits is one) is written by `orjson`
with `e+` (`FLOAT_MARK`), which the batch looks for once in each chunk of written rows."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# A fraction ending a number (`.50`, `.125e3`): found from its literal point, which keeps the scan fast.
_FRACTION = re.compile(rb"\.[0-9]+(?:[eE][-+]?[0-9]+)?(?=[\s,}\]])")
# A member's number with an exponent but no point, or of twenty digits or more (beyond 64 bits).
_EXPONENT_OR_LONG = re.compile(rb'":\s*-?[0-9]+(?:[eE]|[0-9]{19})')
FLOAT_MARK = b"e+"  # in `orjson.dumps` output: a float of 1e16 or more, perhaps an integer that was longer
_NUMBER_START = frozenset(b"-0123456789")


def inexact_lines(data: bytes, first_line: int, *, thorough: bool = False) -> frozenset[int]:
    """The numbers of the lines of `data` (which starts at line `first_line`) that hold a number written with a
    fraction that a float would not give back as written; with `thorough`, also those with a number written with
    an exponent or of twenty digits or more (which the batch finds from its output instead, by `FLOAT_MARK`). A
    match inside a string only costs an exact parse, never a wrong value."""
    found = set()
    for match in _FRACTION.finditer(data):
        start = match.start()
        while start > 0 and data[start - 1] in _NUMBER_START:
            start -= 1
        written = data[start : match.end()]
        if start == match.start() or _survives_float(written):
            continue
        found.add(first_line + data.count(b"\n", 0, start))
    if thorough:
        for match in _EXPONENT_OR_LONG.finditer(data):
            found.add(first_line + data.count(b"\n", 0, match.start()))
    return frozenset(found)


def inexact_of(lines: list[tuple[int, bytes]]) -> frozenset[int]:
    """`inexact_lines` of a list of (line number, raw bytes): one scan of them all, then of each only when one of
    them holds a number with a fraction."""
    data = b"\n".join(raw for _, raw in lines)
    if _FRACTION.search(data) is None:
        return frozenset()
    return frozenset(number for number, raw in lines if inexact_lines(raw, number))


def holds_float_mark(data: bytes) -> bool:
    """Whether written rows hold `FLOAT_MARK`. Found from its `+`, which the C library finds at memory speed and
    rows rarely hold: searching for the two bytes at once costs a microsecond per row (an `e` in every word)."""
    at = data.find(b"+", 1)
    while at > 0:
        if data[at - 1] == 0x65:  # e
            return True
        at = data.find(b"+", at + 1)
    return False


def loads_exact(raw: bytes | str) -> Any:
    """Parse JSON (already known to be valid) keeping every number that a float or a 64-bit integer would alter as
    its written text, which `orjson.dumps` writes back unchanged."""
    return json.loads(raw, parse_float=_written, parse_int=_written_int)


# --- implementation details -------------------------------------------------------------------


def _survives_float(written: bytes) -> bool:
    try:
        return orjson.dumps(orjson.loads(written)) == written
    except orjson.JSONDecodeError:
        return True  # not a number after all (a string's content): the fast parse is right


def _written(text: str) -> Any:
    value = float(text)
    return value if orjson.dumps(value) == text.encode() else orjson.Fragment(text)


def _written_int(text: str) -> Any:
    return int(text) if len(text) < 19 and text != "-0" else orjson.Fragment(text)
