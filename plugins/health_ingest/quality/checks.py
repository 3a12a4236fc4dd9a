"""Structural checks of one NDJSON line. A rejection names a reason and never quotes the record."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from health_ingest.formats.numbers import loads_exact

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")  # `\Z`, not `$`, which accepts a trailing line break
TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
# FHIR's instant: offsets from -14:00 to +14:00 only, which PostgreSQL's timestamptz also reads (it refuses +23:59)
INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))")


MIXED_TYPES = "mixed_resource_types"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record goes to quarantine: a stable code for queries, a message for people."""

    reason: str
    message: str


TOO_DEEP = Rejection("too_deep", "nested deeper than the warehouse's JSON writer allows (255 levels)")


def check_line(raw: bytes, expected_type: str | None, *, allow_comments: bool = False) -> dict[str, Any] | Rejection:
    """Parse one line and return the resource, or the reason it cannot be loaded.

    `expected_type` is the type the file is named after; None accepts any valid type name (a mixed stream).
    `allow_comments`: a line that is JSON once its `//` and `/* */` comments are dropped is read (a source option).
    """
    if b"\\u0000" in raw:
        return Rejection("nul_character", "contains a \\u0000 escape, which PostgreSQL jsonb cannot store")
    try:
        resource = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if not allow_comments:
            return _parse_failure(raw, error)
        try:
            resource = orjson.loads(strip_json_comments(raw))
        except orjson.JSONDecodeError:
            return _parse_failure(raw, error)
    if not isinstance(resource, dict):
        return Rejection("not_an_object", f"a JSON {_json_kind(resource)}, not a resource object")
    resource_type = resource.get("resourceType")
    if resource_type is None:
        return Rejection("missing_resource_type", "no resourceType")
    if expected_type is None and isinstance(resource_type, str) and TYPE_NAME.match(resource_type):
        expected_type = resource_type
    if resource_type != expected_type and isinstance(resource_type, str) and TYPE_NAME.match(resource_type):
        # a record of another type: the file mixes types (`MIXED_TYPES`), which its batch refuses whole
        return Rejection(MIXED_TYPES, f"a resource of type {resource_type} in a file of {expected_type}")
    if resource_type != expected_type:
        shown = (
            f"'{resource_type}'"
            if isinstance(resource_type, str) and TYPE_NAME.match(resource_type)
            else ("not a valid type name")
        )
        where = f"in a file of {expected_type}" if expected_type else "where a resource type name was expected"
        return Rejection("wrong_resource_type", f"resourceType {shown} {where}")
    resource_id = resource.get("id")
    if resource_id is None or resource_id == "":
        return Rejection("missing_id", "no id")
    if not isinstance(resource_id, str) or not FHIR_ID.fullmatch(resource_id):
        return Rejection("invalid_id", "id is not a FHIR id (1-64 characters of A-Z a-z 0-9 - .)")
    meta = resource.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return Rejection("invalid_meta", "meta is not an object")
    if meta:
        if "lastUpdated" in meta and not _is_instant(meta["lastUpdated"]):
            return Rejection("invalid_last_updated", "meta.lastUpdated is not a FHIR instant with a time zone")
        if "security" in meta and type(meta["security"]) is not list:
            return Rejection("invalid_meta", "meta.security is not a list of codings")
    return resource


def check_exact_line(
    raw: bytes, expected_type: str | None, *, allow_comments: bool = False
) -> dict[str, Any] | Rejection:
    """`check_line` for a line whose numbers a float would alter (see `formats.numbers`): the checks are the same,
    and the resource keeps its numbers as written."""
    checked = check_line(raw, expected_type, allow_comments=allow_comments)
    if type(checked) is Rejection:
        return checked
    try:
        try:
            return loads_exact(raw)
        except ValueError:  # JSON once its comments are dropped, which `check_line` allowed
            return loads_exact(strip_json_comments(raw))
    except RecursionError:
        return TOO_DEEP


def last_updated(resource: dict[str, Any]) -> str | None:
    """meta.lastUpdated of a resource that passed `check_line` (so already validated)."""
    meta = resource.get("meta")
    return meta.get("lastUpdated") if meta else None


def strip_json_comments(raw: bytes) -> bytes:
    """The JSON text without its `//` (to the end of the line) and `/* */` comments; strings are kept whole."""
    out, i, n = bytearray(), 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x22:  # a string, copied with its escapes
            j = i + 1
            while j < n and raw[j] != 0x22:
                j += 2 if raw[j] == 0x5C else 1
            out += raw[i : j + 1]
            i = j + 1
        elif raw.startswith(b"//", i):
            j = raw.find(b"\n", i)
            i = n if j < 0 else j
        elif raw.startswith(b"/*", i):
            j = raw.find(b"*/", i + 2)
            i = n if j < 0 else j + 2
            out += b" "
        else:
            j = i
            while j < n and raw[j] not in (0x22, 0x2F):
                j += 1
            if j == i:  # a lone slash
                j += 1
            out += raw[i:j]
            i = j
    return bytes(out)


# --- implementation details -------------------------------------------------------------------


def _parse_failure(raw: bytes, error: orjson.JSONDecodeError) -> Rejection:
    if not raw:  # what a reader gives for a line over the length limit, which it did not keep
        return Rejection("line_too_long", "longer than the line length limit (HEALTH_INGEST_MAX_LINE_BYTES)")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as decode_error:
        return Rejection("invalid_utf8", f"not valid UTF-8 (byte {decode_error.start + 1} of the line)")
    # orjson's message says where parsing stopped, never what it read
    return Rejection("invalid_json", f"not valid JSON: {error.msg} at column {error.colno}")


def _is_instant(value: object) -> bool:
    if not isinstance(value, str) or not INSTANT.fullmatch(value):
        return False
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")
