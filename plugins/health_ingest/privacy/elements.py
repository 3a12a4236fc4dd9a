"""The FHIR R4 element types the pseudonymiser walks resources by, read from a table kept beside this module.

The table is generated from the `fhir.resources` R4 models (`python -m health_ingest.privacy.elements`), so the
batch path never builds a pydantic model: for each type (resource, datatype or backbone element), each JSON key gives
the element's FHIR type, whether it is a list, and whether it is required. A test checks the table against the
installed models.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from importlib import resources
from typing import NamedTuple

TABLE_FILE = "fhir_r4_elements.json"
PRIMITIVE_EXTENSION = "Element"  # the type of `_field`: an id and extensions beside a primitive value
RESOURCE = "Resource"  # contained resources, Bundle entries, Parameters: typed by their own resourceType

PRIMITIVE_TYPES = frozenset(
    {
        *("string", "markdown", "code", "id", "uri", "url", "canonical", "oid", "uuid"),
        *("date", "dateTime", "instant", "time", "base64Binary", "xhtml"),
        *("decimal", "integer", "positiveInt", "unsignedInt", "boolean"),
    }
)


CHOICE = 2  # `required` of one type of a required choice (`content[x]`): another type may be there instead


class Element(NamedTuple):
    """One element of a FHIR type, as the R4 definitions give it."""

    type: str  # a primitive type (`string`, `code`...), a complex type or backbone element name, or `Resource`
    is_list: bool
    required: int  # 0: optional; 1: 1..1 (or 1..*); CHOICE: one type of a required choice (`content[x]`)


@cache
def element_table() -> dict[str, dict[str, Element]]:
    """Every FHIR type's elements by JSON key, read once per process."""
    raw = json.loads((resources.files("health_ingest.privacy") / TABLE_FILE).read_text(encoding="utf-8"))
    return {
        type_name: {key: Element(spec[0], bool(spec[1]), spec[2]) for key, spec in elements.items()}
        for type_name, elements in raw["types"].items()
    }


def build_table() -> dict:
    """The table as the installed `fhir.resources` R4 models define it (slow: imports every model)."""
    import importlib
    import inspect
    import pkgutil
    import typing
    from importlib.metadata import version

    import fhir.resources.R4B as models
    from fhir_core.fhirabstractmodel import FHIRAbstractModel

    def unwrap(annotation):
        is_list, optional = False, False
        while True:
            origin = typing.get_origin(annotation)
            if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
                args = [a for a in typing.get_args(annotation) if a is not type(None)]
                optional = optional or len(args) < len(typing.get_args(annotation))
                annotation = args[0]
            elif origin in (list, typing.List):  # noqa: UP006
                is_list, annotation = True, typing.get_args(annotation)[0]
            else:
                return annotation, is_list, optional

    def type_name(annotation) -> str:
        if typing.get_origin(annotation) is typing.Annotated:
            marker = typing.get_args(annotation)[-1]  # the FHIR type's marker comes last
            name = getattr(marker, "__visit_name__", None) or {"UuidVersion": "uuid"}[type(marker).__name__]
            return {n.lower(): n for n in PRIMITIVE_TYPES}.get(name.lower(), name)
        if annotation is bool:
            return "boolean"
        name = getattr(annotation, "__name__", str(annotation))
        if name == "FHIRPrimitiveExtensionType":
            return PRIMITIVE_EXTENSION
        return name.removesuffix("Type")

    types: dict[str, dict[str, list]] = {}
    for module_info in pkgutil.iter_modules(models.__path__):
        if module_info.name.startswith(("fhirtypes", "tests")):
            continue
        module = importlib.import_module(f"{models.__name__}.{module_info.name}")
        for name, model in vars(module).items():
            if not (inspect.isclass(model) and issubclass(model, FHIRAbstractModel)):
                continue
            if model.__module__ != module.__name__:
                continue
            elements = {}
            for field_name, field in model.model_fields.items():
                if field_name == "fhir_comments":
                    continue
                annotation, is_list, optional = unwrap(field.annotation)
                extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
                required = int(bool(extra.get("element_required") or not optional))
                if extra.get("one_of_many_required"):
                    required = CHOICE
                elements[field.alias or field_name] = [type_name(annotation), int(is_list), required]
            types[name] = dict(sorted(elements.items()))
    unknown = {e[0] for t in types.values() for e in t.values()} - PRIMITIVE_TYPES - set(types) - {RESOURCE}
    if unknown - {PRIMITIVE_EXTENSION}:
        raise ValueError(f"element types the table does not know: {sorted(unknown)}")
    generated_from = f"fhir.resources {version('fhir.resources')} (R4B models)"
    return {"generated_from": generated_from, "types": dict(sorted(types.items()))}


def write_table(path=None) -> None:
    """Regenerate the table file (after upgrading `fhir.resources`)."""
    target = path or resources.files("health_ingest.privacy") / TABLE_FILE
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(build_table(), handle, separators=(",", ":"), sort_keys=False)
        handle.write("\n")


if __name__ == "__main__":
    write_table(sys.argv[1] if len(sys.argv) > 1 else None)
