"""FHIR Bundles (transaction, batch, collection, searchset) as input: entries become resources, one NDJSON file
per resource type, with `urn:uuid:` and conditional references resolved to `Type/id` before pseudonymisation.

A Bundle is one JSON document, so it is parsed whole, one at a time; what comes out is streamed like any export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from health_ingest.config import read_limits
from health_ingest.errors import DeliveryError
from health_ingest.formats.numbers import inexact_lines, loads_exact
from health_ingest.formats.resource_types import RESOURCE_TYPES

BUNDLE_TYPES = {"transaction", "batch", "collection", "searchset", "transaction-response", "batch-response"}
CONDITIONAL = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)\?identifier=(?P<system>[^|&]*)\|(?P<value>[^&]+)$")


@dataclass
class BundleIndex:
    """What references can resolve to across a delivery's bundles: full URLs and identifiers."""

    full_urls: dict[str, str] = field(default_factory=dict)
    identifiers: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def add(self, bundle: dict) -> None:
        for entry in bundle.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("id"), str):
                continue
            literal = f"{resource.get('resourceType')}/{resource['id']}"
            if isinstance(entry.get("fullUrl"), str):
                self.full_urls[entry["fullUrl"]] = literal
            for identifier in resource.get("identifier") or ():
                if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
                    key = (resource.get("resourceType"), identifier.get("system", ""), identifier["value"])
                    self.identifiers[key] = literal

    def resolve(self, reference: str) -> str:
        if reference in self.full_urls:
            return self.full_urls[reference]
        conditional = CONDITIONAL.match(reference)
        if conditional:
            key = (conditional["type"], conditional["system"], conditional["value"])
            return self.identifiers.get(key, reference)
        return reference


def read_bundle(path: Path, label: str) -> dict:
    """`label` names the file in errors (the delivered name may identify someone). A Bundle is parsed whole, so its
    size is bounded (`HEALTH_INGEST_MAX_BUNDLE_BYTES`); its numbers are kept as written."""
    limit = read_limits().bundle_bytes
    if path.stat().st_size > limit:
        raise DeliveryError(f"{label}: a Bundle larger than {limit} bytes (HEALTH_INGEST_MAX_BUNDLE_BYTES)")
    data = path.read_bytes()
    try:
        document = orjson.loads(data)
        if inexact_lines(data, 1, thorough=True):
            document = loads_exact(data)
    except orjson.JSONDecodeError as error:
        raise DeliveryError(f"{label}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except RecursionError:
        raise DeliveryError(f"{label}: nested too deep to be read") from None
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        raise DeliveryError(f"{label}: a JSON file of a delivery must be a FHIR Bundle")
    if document.get("type") not in BUNDLE_TYPES:
        shown = document.get("type") if document.get("type") in {"document", "message", "history"} else "other"
        raise DeliveryError(f"{label}: a Bundle of type {shown} does not carry resources to load")
    return document


def index_bundles(bundles: list[tuple[Path, str]]) -> BundleIndex:
    """First pass over the delivery: every bundle's full URLs and identifiers."""
    index = BundleIndex()
    for path, label in bundles:
        index.add(read_bundle(path, label))
    return index


def explode_bundle(path: Path, label: str, index: BundleIndex, folder: Path) -> list[Path]:
    """Second pass, one bundle at a time: write its entries as `<Type>.from.<label>.ndjson` files."""
    bundle = read_bundle(path, label)
    handles: dict[str, object] = {}
    written = []
    try:
        for resource in _entries(bundle):
            if type(resource) is not dict:  # a line of its own, quarantined as what it is, so it is counted
                resource_type = "Basic"
                if resource_type not in handles:
                    target = folder / f"{resource_type}.from.{label.removesuffix('.json')}.ndjson"
                    handles[resource_type] = target.open("wb")
                    written.append(target)
                handles[resource_type].write(orjson.dumps(resource) + b"\n")
                continue
            resource_type = resource.get("resourceType")
            if resource_type not in RESOURCE_TYPES:
                resource_type = "Basic"  # checked, and quarantined, as a resource of the wrong type
            if resource_type not in handles:
                target = folder / f"{resource_type}.from.{label.removesuffix('.json')}.ndjson"
                handles[resource_type] = target.open("wb")
                written.append(target)
            _resolve_references(resource, index)
            try:
                line = orjson.dumps(resource)
            except TypeError:  # nested beyond orjson's writer: written by another, quarantined when checked
                line = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()
            handles[resource_type].write(line + b"\n")
    finally:
        for handle in handles.values():
            handle.close()
    return written


# --- implementation details -------------------------------------------------------------------


def _entries(bundle: dict) -> Iterator[object]:
    """Each entry's resource; an entry that is not an object, or whose resource is not one, is given as it is.
    An entry without a resource (a transaction's DELETE) gives nothing."""
    for entry in bundle.get("entry") or ():
        if not isinstance(entry, dict):
            yield entry
        elif "resource" in entry:
            yield entry["resource"]


def _resolve_references(node, index: BundleIndex) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                node[key] = index.resolve(value)
            elif isinstance(value, dict | list):
                _resolve_references(value, index)
    elif isinstance(node, list):
        for item in node:
            _resolve_references(item, index)
