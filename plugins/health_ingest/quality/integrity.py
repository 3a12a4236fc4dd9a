"""Rules of the R4 specification that no FHIRPath invariant states: Bundle integrity, the ids of contained and
bundled resources, narrative links, and the value types the core extension definitions allow.

Each finding names its rule and the element's path, never a value of the record.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from health_ingest.quality.checks import FHIR_ID
from health_ingest.quality.invariants import Finding, extension_value_types

ABSOLUTE_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
RESTFUL_URL = re.compile(r"^(?P<base>.*?/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(/_history/[^/]+)?$")
NARRATIVE_LINK = re.compile(r"""<a\b[^>]*\bhref\s*=\s*["']#([^"']*)["']""", re.IGNORECASE)
XHTML_ANCHOR = re.compile(r"""\b(?:id|name)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)
# Bundles whose references point inside the Bundle: a reference that does not resolve, or resolves twice, is wrong
RESOLVING_BUNDLES = {"document", "message", "transaction"}


def findings(resource: dict[str, Any]) -> Iterator[Finding]:
    """The integrity rules' findings on a resource, its contained resources and its Bundle entries."""
    yield from _resource(resource, resource["resourceType"] if isinstance(resource.get("resourceType"), str) else "")


# --- implementation details -------------------------------------------------------------------


def _resource(resource: dict[str, Any], where: str) -> Iterator[Finding]:
    kind = resource.get("resourceType")
    yield from _narrative_links(resource, where)
    yield from _extensions(resource, where)
    for index, contained in enumerate(_items(resource.get("contained"))):
        at = f"{where}.contained[{index}]"
        yield from _resource_id(contained, at, required=True)
        yield from _resource(contained, at)
    if kind == "Bundle":
        yield from _bundle(resource, where)
        for index, entry in enumerate(_items(resource.get("entry"))):
            inner = entry.get("resource")
            if isinstance(inner, dict):
                at = f"{where}.entry[{index}].resource"
                yield from _resource_id(inner, at, required=False)
                yield from _resource(inner, at)


def _resource_id(resource: dict[str, Any], where: str, *, required: bool) -> Iterator[Finding]:
    value = resource.get("id")
    if value is None:
        if required:
            yield Finding("contained-id", "error", f"{where}.id", "A contained resource SHALL have an id")
    elif not isinstance(value, str) or not FHIR_ID.match(value):
        yield Finding("id-format", "error", f"{where}.id", "An id is 1 to 64 characters of A-Z, a-z, 0-9, '-' and '.'")


def _bundle(bundle: dict[str, Any], where: str) -> Iterator[Finding]:
    kind = bundle.get("type")
    entries = list(_items(bundle.get("entry")))
    self_links = [link for link in _items(bundle.get("link")) if link.get("relation") == "self"]
    if len(self_links) > 1:
        yield Finding("bundle-self-link", "error", f"{where}.link", "A Bundle has at most one 'self' link")
    full_urls: list[str | None] = []
    for index, entry in enumerate(entries):
        url = entry.get("fullUrl")
        full_urls.append(url if isinstance(url, str) else None)
        if isinstance(url, str) and not ABSOLUTE_URI.match(url):
            yield Finding("bundle-fullurl", "error", f"{where}.entry[{index}].fullUrl", "fullUrl SHALL be absolute")
    if kind != "history":
        seen: Counter = Counter()
        for index, entry in enumerate(entries):
            inner = entry.get("resource")
            if not isinstance(inner, dict) or not isinstance(inner.get("id"), str):
                continue
            version = (inner.get("meta") or {}).get("versionId") if isinstance(inner.get("meta"), dict) else None
            identity = (inner.get("resourceType"), inner["id"], version)
            seen[identity] += 1
            if seen[identity] == 2:
                yield Finding(
                    "bundle-duplicate-id",
                    "error",
                    f"{where}.entry[{index}].resource.id",
                    "Two entries of a Bundle hold the same resource (type, id and version)",
                )
    if kind == "searchset":
        for index, entry in enumerate(entries):
            inner = entry.get("resource")
            mode = (entry.get("search") or {}).get("mode") if isinstance(entry.get("search"), dict) else None
            outcome = mode == "outcome" or (mode is None and inner.get("resourceType") == "OperationOutcome")
            if isinstance(inner, dict) and not outcome and not inner.get("id"):
                yield Finding(
                    "bundle-search-id", "error", f"{where}.entry[{index}].resource", "Search results must have ids"
                )
    if kind in RESOLVING_BUNDLES:
        yield from _bundle_references(entries, full_urls, where, kind)


def _bundle_references(entries: list[dict], full_urls: list[str | None], where: str, kind: str) -> Iterator[Finding]:
    targets = []  # (fullUrl, type, id, version) of each entry
    for entry, url in zip(entries, full_urls, strict=True):
        inner = entry.get("resource") if isinstance(entry.get("resource"), dict) else {}
        meta = inner.get("meta") if isinstance(inner.get("meta"), dict) else {}
        targets.append((url, inner.get("resourceType"), inner.get("id"), meta.get("versionId")))
    for index, entry in enumerate(entries):
        inner = entry.get("resource")
        if not isinstance(inner, dict):
            continue
        base = _base_of(full_urls[index])
        for path, reference in _references(inner, f"{where}.entry[{index}].resource"):
            if reference.startswith("#"):
                continue
            restful = RESTFUL_URL.match(reference)
            version = reference.split("/_history/")[1] if restful and "/_history/" in reference else None
            unversioned = reference.split("/_history/")[0]
            if reference.startswith(("urn:uuid:", "urn:oid:")):
                matches = sum(url == reference for url, *_ in targets)
            elif restful and not ABSOLUTE_URI.match(reference):
                matches = sum(
                    ((bool(base) and url == base + unversioned) or (kind_, id_) == restful.group("type", "id"))
                    and (version is None or version == version_)
                    for url, kind_, id_, version_ in targets
                )
                if not matches and kind == "transaction":
                    continue  # a transaction may point at resources already on the server
            else:
                matches = sum(url == unversioned and (version is None or version == v) for url, _, _, v in targets)
                if not matches:
                    continue  # an absolute URL outside the Bundle
            if matches == 0:
                yield Finding("bundle-reference", "error", path, "A reference inside the Bundle does not resolve")
            elif matches > 1:
                yield Finding("bundle-reference", "error", path, "A reference inside the Bundle resolves to 2 entries")


def _base_of(full_url: str | None) -> str:
    match = RESTFUL_URL.match(full_url or "")
    return match.group("base") or "" if match and ABSOLUTE_URI.match(full_url or "") else ""


def _references(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(path, reference) of every Reference.reference under `node`, not inside a nested resource."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield f"{where}.reference", value
            elif key not in ("contained", "resource") or not isinstance(value, dict | list):
                yield from _references(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _references(item, f"{where}[{index}]")


def _narrative_links(resource: dict[str, Any], where: str) -> Iterator[Finding]:
    text = resource.get("text")
    div = text.get("div") if isinstance(text, dict) else None
    if not isinstance(div, str) or "#" not in div:
        return
    targets = set(XHTML_ANCHOR.findall(div)) | set(_element_ids(resource))
    for link in NARRATIVE_LINK.findall(div):
        if link and link not in targets:
            yield Finding("narrative-link", "error", f"{where}.text.div", "A narrative link '#...' does not resolve")
            return


def _element_ids(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "id" and isinstance(value, str):
                yield value
            elif isinstance(value, dict | list):
                yield from _element_ids(value)
    elif isinstance(node, list):
        for item in node:
            yield from _element_ids(item)


def _extensions(node: Any, where: str) -> Iterator[Finding]:
    """Extensions of the core definitions whose value is of a type the definition does not allow."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("contained", "resource") and isinstance(value, dict | list):
                continue  # checked as resources of their own
            at = f"{where}.{key}"
            if key in ("extension", "modifierExtension") and isinstance(value, list):
                for index, extension in enumerate(value):
                    if isinstance(extension, dict):
                        yield from _extension_value(extension, f"{at}[{index}]")
            if isinstance(value, dict | list):
                yield from _extensions(value, at)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _extensions(item, f"{where}[{index}]")


def _extension_value(extension: dict[str, Any], where: str) -> Iterator[Finding]:
    allowed = extension_value_types().get(extension.get("url"))
    if not allowed:
        return
    for key in extension:
        if key.startswith("value") and len(key) > 5:
            kind = key[5].lower() + key[6:]
            if kind not in allowed and key[5:] not in allowed:
                yield Finding(
                    "extension-value-type",
                    "error",
                    f"{where}.{key}",
                    "The extension's definition does not allow a value of this type",
                )


def _items(value: Any) -> Iterator[dict]:
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))
