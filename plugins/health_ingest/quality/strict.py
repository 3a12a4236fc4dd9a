"""Strict FHIR validation (a per-source option): the `fhir.resources` R4 model plus generic rules.

It runs in the worker processes, before pseudonymisation, and only when a source asks for it: building the
pydantic models is far slower than the structural checks. Messages give the element and the rule, never the value.
"""

from __future__ import annotations

import base64
import binascii
import re
from functools import cache
from typing import Any

from health_ingest.quality.checks import Rejection

EMBEDDED_HTML = re.compile(r"<\s*/?\s*[A-Za-z][^<>]*>")
UNSAFE_NARRATIVE = re.compile(r"<\s*(script|iframe|object|embed|form)\b|\son[a-z]+\s*=|javascript:", re.IGNORECASE)


def strict_problem(resource: dict[str, Any]) -> Rejection | None:
    """None when the resource is valid; else why not."""
    problem = _generic_problem(resource, resource["resourceType"])
    if problem:
        return problem
    model = _model(resource["resourceType"])
    if model is None:
        return Rejection("invalid_fhir", f"{resource['resourceType']} is not an R4 resource type")
    try:
        model.model_validate(resource)
    except Exception as error:  # pydantic.ValidationError, or the model's own checks
        return Rejection("invalid_fhir", _describe(error))
    return None


# --- implementation details -------------------------------------------------------------------


@cache
def _model(resource_type: str):
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except KeyError:
        return None


def _describe(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            details = errors(include_input=False, include_url=False)
        except TypeError:
            details = errors()
        first = details[0] if details else {}
        location = ".".join(str(part) for part in first.get("loc", ())) or "resource"
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        return f"not valid FHIR R4 at {location}: {first.get('msg', 'invalid')}{more}"
    return f"not valid FHIR R4: {type(error).__name__}"


def _generic_problem(node: Any, path: str) -> Rejection | None:
    """Rules the model does not enforce: no empty arrays, base64 that decodes, sizes that match, no HTML."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}"
            if isinstance(value, list) and not value:
                return Rejection("invalid_fhir", f"{where}: an array must not be empty (omit the element)")
            if key == "data" and isinstance(value, str):
                try:
                    decoded = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    return Rejection("invalid_fhir", f"{where}: not valid base64")
                size = node.get("size")
                if isinstance(size, int) and size != len(decoded):
                    return Rejection("invalid_fhir", f"{path}.size: does not match the attachment's content")
            elif key == "div" and isinstance(value, str):
                if UNSAFE_NARRATIVE.search(value):
                    return Rejection("invalid_fhir", f"{where}: the narrative holds active content (scripts, events)")
            elif isinstance(value, str):
                if EMBEDDED_HTML.search(value):
                    return Rejection("invalid_fhir", f"{where}: a string holds embedded HTML tags")
            else:
                problem = _generic_problem(value, where)
                if problem:
                    return problem
    elif isinstance(node, list):
        for index, item in enumerate(node):
            problem = _generic_problem(item, f"{path}[{index}]")
            if problem:
                return problem
    return None
