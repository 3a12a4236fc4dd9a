"""Strict FHIR validation (a per-source option): the `fhir.resources` R4 model, the R4 specification's invariants,
the integrity rules no invariant states (Bundles, ids, narrative links, extension value types) and generic rules.

It runs in the worker processes, before pseudonymisation, and only when a source asks for it: building the
pydantic models and evaluating FHIRPath are far slower than the structural checks. Messages give the rule and the
element's path, never a value. Out of scope: terminology (displays, value-set bindings) and the profiles of
implementation guides.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from health_ingest.quality import integrity, invariants
from health_ingest.quality.checks import Rejection

EMBEDDED_HTML = re.compile(r"<\s*/?\s*[A-Za-z][^<>]*>")
UNSAFE_NARRATIVE = re.compile(r"<\s*(script|iframe|object|embed|form)\b|\son[a-z]+\s*=|javascript:", re.IGNORECASE)
EXAMPLE_URL = re.compile(r"^[a-z][a-z0-9+.-]*://([^/]*\.)?example\.(org|com|net)(:[0-9]+)?(/|$)", re.IGNORECASE)
URL_KEYS = {"url", "reference", "system", "valueUri", "valueUrl", "valueCanonical", "profile", "source"}
CORE_EXTENSIONS = "http://hl7.org/fhir/StructureDefinition/"
# the specification's cross-version extensions (an element of another FHIR version, carried in R4)
CROSS_VERSION_EXTENSIONS = re.compile(r"^http://hl7\.org/fhir/[0-9.]+/StructureDefinition/extension-")
# the extensions HL7 publishes for validators and tools beside the core (valueset-parameter, ...)
TOOLS_EXTENSIONS = "http://hl7.org/fhir/tools/StructureDefinition/"
ABSOLUTE_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
ABSOLUTE_SYSTEMS = {"Coding", "Identifier"}  # their `system` names a code system or namespace: never relative
MAX_STRING = 1024 * 1024  # the R4 `string` datatype: at most 1 MB


@dataclass(frozen=True)
class StrictRules:
    """The options a source gives strict validation (`quality: {strict: {...}}`), as validators have them."""

    security_checks: bool = True  # strings (not markdown, not narrative) must not hold HTML tags
    html_in_markdown: bool = True  # markdown may hold HTML-like text: its presentation layer escapes it
    example_urls: bool = True  # URLs on example.org, example.com, example.net
    known_extensions_only: bool = False  # extensions must be the core's (or of `extension_domains`)
    extension_domains: tuple[str, ...] = ()
    allow_comments: bool = False  # JSON with // and /* */ comments is read (they are dropped)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extension_domains", tuple(self.extension_domains))


@dataclass(frozen=True, slots=True)
class StrictOutcome:
    """A record's verdict: why it is quarantined (None: it loads), and the warnings it raised, by rule."""

    rejection: Rejection | None
    warnings: Counter = field(default_factory=Counter)


def strict_check(resource: dict[str, Any], rules: StrictRules | None = None) -> StrictOutcome:
    """Every rule of strict mode on one resource: the first error rejects it; warnings are counted."""
    rules = rules or StrictRules()
    problem = _generic_problem(resource, resource["resourceType"], rules, resource["resourceType"])
    if problem:
        return StrictOutcome(problem)
    model = _model(resource["resourceType"])
    if model is None:
        return StrictOutcome(Rejection("invalid_fhir", f"{resource['resourceType']} is not an R4 resource type"))
    try:
        model.model_validate(resource)
    except Exception as error:  # pydantic.ValidationError, or the model's own checks
        return StrictOutcome(Rejection("invalid_fhir", _describe(error)))
    warnings: Counter = Counter()
    for found in itertools.chain(invariants.findings(resource), integrity.findings(resource)):
        if found.severity == "error":
            return StrictOutcome(Rejection("invalid_fhir", f"rule {found.key} failed at {found.path}: {found.human}"))
        warnings[found.key] += 1
    return StrictOutcome(None, warnings)


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


def _generic_problem(node: Any, path: str, rules: StrictRules, model: str | None) -> Rejection | None:
    """Rules the model does not enforce: no empty arrays, base64 that decodes, sizes that match, no HTML where
    the options forbid it, no example URLs, known extensions. `model` is the FHIR type of `node`, when known."""
    if isinstance(node, dict):
        markdown, children = _element_types(model) if model else (frozenset(), {})
        for key, value in node.items():
            where = f"{path}.{key}"
            if value is None:
                return Rejection("invalid_fhir", f"{where}: null is not a FHIR value (omit the element)")
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
                problem = _xhtml_problem(value, where)
                if problem:
                    return problem
            elif isinstance(value, str):
                if key == "system" and model in ABSOLUTE_SYSTEMS and not ABSOLUTE_URI.match(value):
                    return Rejection("invalid_fhir", f"{where}: {model}.system must be an absolute URI")
                problem = _string_problem(key, value, where, key in markdown, rules)
                if problem:
                    return problem
            else:
                if key in ("extension", "modifierExtension") and isinstance(value, list):
                    problem = _extension_problem(value, where, rules, nested=model == "Extension")
                    if problem:
                        return problem
                child = children.get(key)
                if key == "contained" or (key == "resource" and isinstance(value, dict)):
                    child = value.get("resourceType") if isinstance(value, dict) else None
                problem = _generic_problem(value, where, rules, child)
                if problem:
                    return problem
    elif isinstance(node, list):
        for index, item in enumerate(node):
            child = item.get("resourceType", model) if isinstance(item, dict) and "resourceType" in item else model
            problem = _generic_problem(item, f"{path}[{index}]", rules, child)
            if problem:
                return problem
    return None


def _xhtml_problem(div: str, where: str) -> Rejection | None:
    """A narrative is an XHTML `div`: well-formed XML, XML's own entities only (no `&reg;`), in its namespace."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(div)
    except ElementTree.ParseError as error:
        return Rejection("invalid_fhir", f"{where}: not well-formed XHTML ({str(error).split(':')[0]})")
    if root.tag != "{http://www.w3.org/1999/xhtml}div":
        return Rejection("invalid_fhir", f"{where}: the narrative must be an XHTML div")
    return None


def _string_problem(key: str, value: str, where: str, markdown: bool, rules: StrictRules) -> Rejection | None:
    if len(value) > MAX_STRING // 4 and len(value.encode()) > MAX_STRING:
        return Rejection("invalid_fhir", f"{where}: a string of FHIR is at most 1 MB")
    if markdown:
        if not rules.html_in_markdown and EMBEDDED_HTML.search(value):
            return Rejection("invalid_fhir", f"{where}: the markdown holds what looks like an HTML tag")
    elif rules.security_checks and EMBEDDED_HTML.search(value):
        return Rejection("invalid_fhir", f"{where}: a string holds embedded HTML tags")
    if not rules.example_urls and key in URL_KEYS and EXAMPLE_URL.match(value):
        return Rejection("invalid_fhir", f"{where}: example URLs are not allowed here")
    return None


def _extension_problem(extensions: list, where: str, rules: StrictRules, *, nested: bool) -> Rejection | None:
    """`nested`: the extensions of a complex extension, whose urls may be the names its definition gives them."""
    for index, extension in enumerate(extensions):
        url = extension.get("url") if isinstance(extension, dict) else None
        if not isinstance(url, str) or not url:
            return Rejection("invalid_fhir", f"{where}[{index}]: an extension needs a url")
        if "|" in url:
            return Rejection("invalid_fhir", f"{where}[{index}]: an extension url must not carry a |version")
        if not rules.example_urls and EXAMPLE_URL.match(url):
            return Rejection("invalid_fhir", f"{where}[{index}]: example URLs are not allowed here")
        known = (
            url.startswith((CORE_EXTENSIONS, TOOLS_EXTENSIONS))
            or CROSS_VERSION_EXTENSIONS.match(url)
            or (nested and not ABSOLUTE_URI.match(url))
            or any(url.startswith(d) for d in rules.extension_domains)
        )
        if rules.known_extensions_only and not known:
            return Rejection("invalid_fhir", f"{where}[{index}]: the extension's definition is unknown")
    return None


@cache
def _element_types(definition: str) -> tuple[frozenset[str], dict[str, str]]:
    """For a definition (Coding, Observation, Observation.component): its markdown elements, and the definition
    of each complex element's content, from the specification's StructureDefinitions."""
    markdown, children = set(), {}
    for key, (target, _, code) in invariants.element_children(definition).items():
        if code == "markdown":
            markdown.add(key)
        elif target is not None and target != "#resource":
            children[key] = target
    return frozenset(markdown), children
