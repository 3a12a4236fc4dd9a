"""What the pseudonymiser does with each element of each FHIR type: compiled once per set of kept paths from the
element table, so that walking a resource is one dictionary lookup per key and never a model.

A string that is not a code, a URI, a date, an identifier the plan tokenises or a reference is free text, and is
removed unless a path keeps it on purpose (`keep_free_text` in a source's privacy policy).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import NamedTuple

from health_ingest.privacy.elements import PRIMITIVE_EXTENSION, RESOURCE, element_table

# actions, as small ints: the walk compares them in the order of how often they occur. The most frequent ones
# have a variant for one value and one for a list, so that the walk need not look at the cardinality for them.
KEEP_ONE, COMPLEX_ONE, COMPLEX_LIST, KEEP, COMPLEX, REFERENCE, DISPLAY, TEXT, NUMBER, BOOLEAN, DROP = range(11)
IDENTIFIER_VALUE, REFERENCE_DISPLAY, ADDRESS, EXTENSION, SUB_EXTENSION = range(11, 16)
PRIMITIVE_EXT, CONTAINED, NESTED_RESOURCE, OBSERVATION_TEXT = range(16, 20)

FREE_TEXT = "free text"  # why something was removed, as counted per batch
KEPT_PRIMITIVES = frozenset(
    {"code", "id", "uri", "url", "canonical", "oid", "uuid", "date", "dateTime", "instant", "time"}
)
# elements of type id or oid that are identifiers of the record's subject matter, not of the resource
TOKENISED_IDS = frozenset({"ImagingStudySeries.uid", "ImagingStudySeriesInstance.uid"})
NUMBERS = frozenset({"decimal", "integer", "positiveInt", "unsignedInt"})
TEXTS = frozenset({"string", "markdown", "xhtml", "base64Binary"})  # base64Binary: a document, a signature, a photo
# Datatypes in nearly every resource, which the walk takes a shorter way through when an element has their usual shape
# (`ResourcePseudonymiser._shortcuts`): a spec's `shortcut` is the position of its child's type here, from 1.
SHORTCUT_TYPES = ("Reference", "Coding", "CodeableConcept")
# the actions each shorter way assumes its type's table has: a kept path that changes one turns that way off
_SHORTCUT_ACTIONS = {
    "Reference": {"reference": REFERENCE, "display": REFERENCE_DISPLAY},
    "Coding": {"system": KEEP_ONE, "code": KEEP_ONE, "display": DISPLAY},
    "CodeableConcept": {"coding": COMPLEX_LIST, "text": TEXT},
}


class Spec(NamedTuple):
    """What the walk does with one element; a compiled plan holds it as a plain tuple (`_finish`)."""

    action: int
    child: Fields | None
    is_list: bool
    label: str  # `Type.element`, for the counts of what was removed
    required: int  # 0, 1 or CHOICE (elements.Element.required)
    free_text: tuple[str, str] = ("", "")  # ("free text", label): what the walk logs when it removes free text
    shortcut: int = 0  # 1 + the position in SHORTCUT_TYPES of the child's type, when the walk may take its shorter way


# One FHIR type's elements by JSON key: a plain dict of strings only (a subclass, or a key of another type, would
# slow each of the walk's lookups).
Fields = dict


def type_name(fields: Fields) -> str:
    """The name of a table's type, which each of its labels starts with (every type has elements)."""
    return next(iter(fields.values()))[3].partition(".")[0]


class Plan(NamedTuple):
    resources: dict[str, Fields]  # by resourceType
    element: Fields  # what `_field` beside a primitive holds: an id and extensions


def compile_plan(
    keep: frozenset[str] = frozenset(), dropped_fields=frozenset(), dropped_types=frozenset(), kept_strings=frozenset()
) -> Plan:
    """The walk's tables for one set of kept free-text paths (`Type.element[.element...]`); cached."""
    return _compile(frozenset(keep), frozenset(dropped_fields), frozenset(dropped_types), frozenset(kept_strings))


def check_kept_paths(paths) -> None:
    """Refuse a path that names no free-text element: a typo would otherwise keep nothing, silently."""
    table = element_table()
    for path in paths:
        _resolve(table, path)


@cache
def identifying_codes() -> frozenset[tuple[str, str]]:
    """(system, code) of the Observation codes whose value identifies a person."""
    raw = json.loads((resources.files("health_ingest.privacy") / "identifying_codes.json").read_text("utf-8"))
    return frozenset((c["system"], c["code"]) for c in raw["codes"])


@cache
def trusted_code_systems() -> tuple[frozenset[str], tuple[str, ...], tuple[str, ...]]:
    """Systems whose displays are the system's own: exact URLs, prefixes, and prefixes excluded from those."""
    raw = json.loads((resources.files("health_ingest.privacy") / "code_systems.json").read_text("utf-8"))
    return frozenset(raw["systems"]), tuple(raw["prefixes"]), tuple(raw.get("excluded_prefixes", ()))


# --- implementation details -------------------------------------------------------------------


@cache
def _compile(keep, dropped_fields, dropped_types, kept_strings) -> Plan:
    table = element_table()
    compiled: dict[str, Fields] = {name: {} for name in table}
    for name, elements in table.items():
        fields = compiled[name]
        for key, element in elements.items():
            label = f"{name}.{key}"
            action = _action(name, key, element.type, label, dropped_fields, dropped_types, kept_strings)
            child = compiled.get(element.type)
            if element.type == PRIMITIVE_EXTENSION:
                child = compiled["Element"]
            if action == KEEP:
                action = KEEP if element.is_list else KEEP_ONE
            elif action == COMPLEX:
                action = COMPLEX_LIST if element.is_list else COMPLEX_ONE
            fields[key] = Spec(action, child, element.is_list, label, element.required, (FREE_TEXT, label))
        if "implicitRules" in elements:  # a resource
            fields["resourceType"] = Spec(KEEP_ONE, None, False, f"{name}.resourceType", True)
    for path in sorted(keep):
        owner, key = _resolve(table, path, compiled)
        spec = owner[key]
        owner[key] = spec._replace(action=KEEP if spec.is_list else KEEP_ONE)
    resource_types = {name: compiled[name] for name, elements in table.items() if "implicitRules" in elements}
    _finish(compiled, _shortcuts(compiled))
    return Plan(resource_types, compiled["Element"])


def _action(type_name, key, element_type, label, dropped_fields, dropped_types, kept_strings) -> int:
    if key in dropped_fields or element_type in dropped_types:
        return DROP
    if key == "contained":
        return CONTAINED
    if element_type == RESOURCE:
        return NESTED_RESOURCE
    if element_type == PRIMITIVE_EXTENSION:
        return PRIMITIVE_EXT
    if element_type == "Address":
        return ADDRESS
    if element_type == "Extension":
        return SUB_EXTENSION if type_name == "Extension" and key == "extension" else EXTENSION
    if type_name == "Reference" and key == "reference":
        return REFERENCE
    if type_name == "Reference" and key == "display":
        return REFERENCE_DISPLAY
    if type_name == "Identifier" and key == "value":
        return IDENTIFIER_VALUE
    if type_name == "Identifier" and key == "assigner":
        return DROP  # an organisation that, with the value's system, narrows who the person is
    if type_name == "Coding" and key == "display":
        return DISPLAY
    if label in TOKENISED_IDS:
        return IDENTIFIER_VALUE  # DICOM UIDs name a study, a series, an image: tokenised like identifiers
    if type_name == "Attachment" and key in ("data", "url", "title"):
        return DROP  # attachment contents: a clinical note holds the patient's name
    if key == "id" and element_type == "string":
        return KEEP  # an element's own id, pointed at from inside the resource
    if element_type in TEXTS:
        if label in kept_strings:
            return KEEP
        if type_name in ("Observation", "ObservationComponent") and key == "valueString":
            return OBSERVATION_TEXT
        return TEXT
    if element_type in KEPT_PRIMITIVES:
        return KEEP
    if element_type in NUMBERS:
        return NUMBER
    if element_type == "boolean":
        return BOOLEAN
    return COMPLEX


def _shortcuts(compiled: dict[str, Fields]) -> dict[int, int]:
    """`Spec.shortcut` by the id of the shared table it is for: those of SHORTCUT_TYPES whose table has the actions
    its shorter way assumes. A table copied for a kept path has none: it is walked in full."""
    usable = {}
    for number, name in enumerate(SHORTCUT_TYPES, start=1):
        fields = compiled[name]
        if all(fields[key].action == action for key, action in _SHORTCUT_ACTIONS[name].items()):
            usable[id(fields)] = number
    concept = compiled["CodeableConcept"]
    # a CodeableConcept's shorter way takes its Codings' own, and knows its text to be optional
    if id(concept["coding"].child) not in usable or concept["text"].required:
        usable.pop(id(concept), None)
    return usable


def _finish(compiled: dict[str, Fields], shortcuts: dict[int, int]) -> None:
    """Give each spec its shortcut, and make it a plain tuple, whose subscripts the interpreter specialises (a named
    tuple's it does not): every table, and every copy made for a kept path, once."""
    done: set[int] = set()
    tables = list(compiled.values())
    while tables:
        fields = tables.pop()
        if id(fields) in done:
            continue
        done.add(id(fields))
        for key, spec in fields.items():
            if spec.child is not None:
                tables.append(spec.child)
            fields[key] = tuple(spec._replace(shortcut=shortcuts.get(id(spec.child), 0)))


def _resolve(table, path: str, compiled: dict[str, Fields] | None = None) -> tuple[Fields | dict, str]:
    """The (fields, key) a kept path names; with `compiled`, the tables along it are copied first, so that
    `Observation.code.text` keeps the text of that CodeableConcept only, and `CodeableConcept.text` every one."""
    segments = path.split(".") if isinstance(path, str) else []
    if len(segments) < 2 or segments[0] not in table:
        raise ValueError(f"keep_free_text: '{path}' is not a FHIR path (Type.element[.element...])")
    type_name, owner = segments[0], compiled[segments[0]] if compiled else None
    for depth, key in enumerate(segments[1:], start=1):
        element = table[type_name].get(key)
        if element is None:
            raise ValueError(f"keep_free_text: '{path}': {type_name} has no element '{key}'")
        last = depth == len(segments) - 1
        if last:
            if element.type not in TEXTS:
                raise ValueError(f"keep_free_text: '{path}' is a {element.type}, not free text")
            return (owner, key) if compiled else (table[type_name], key)
        if element.type not in table:
            raise ValueError(f"keep_free_text: '{path}': {type_name}.{key} has no elements")
        if compiled:
            spec = owner[key]
            copy = dict(spec.child)
            owner[key] = spec._replace(child=copy)
            owner = copy
        type_name = element.type
    raise AssertionError("unreachable")
