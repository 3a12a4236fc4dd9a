"""Rewrite one FHIR resource so that no direct identifier is left: allow-list extensions, tokens for ids."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Any

import orjson

from health_ingest.errors import RecordProblem
from health_ingest.privacy import element_plan as plan
from health_ingest.privacy.compat import MicrosoftCompatTokeniser
from health_ingest.privacy.dates import DateShifter
from health_ingest.privacy.element_plan import (
    ADDRESS,
    BOOLEAN,
    COMPLEX_LIST,
    COMPLEX_ONE,
    CONTAINED,
    DISPLAY,
    DROP,
    EXTENSION,
    FREE_TEXT,
    IDENTIFIER_VALUE,
    KEEP,
    KEEP_ONE,
    NESTED_RESOURCE,
    NUMBER,
    OBSERVATION_TEXT,
    PRIMITIVE_EXT,
    REFERENCE_DISPLAY,
    SUB_EXTENSION,
    TEXT,
    Fields,
)
from health_ingest.privacy.element_plan import (
    REFERENCE as LITERAL_REFERENCE,
)
from health_ingest.privacy.elements import CHOICE
from health_ingest.privacy.generalise import generalise_birth_date, generalise_postal_code
from health_ingest.privacy.policy import PrivacyPolicy
from health_ingest.privacy.tokens import Tokeniser

# Fields that hold direct identifiers or free text about a person: removed wherever they appear.
DROPPED_FIELDS = frozenset({"telecom", "photo", "contact", "note", "comment", "patientInstruction"})
# Datatypes removed whole: names, contact points, narratives, annotations (free text about someone), and a
# location's coordinates (a home, sometimes).
DROPPED_TYPES = frozenset({"HumanName", "ContactPoint", "Narrative", "Annotation", "LocationPosition"})

# Only these extensions survive: an unknown extension may carry identifiers (a mother's maiden name,
# a birth place, a geolocation).
ALLOWED_EXTENSIONS = frozenset(
    {
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
        "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
    }
)
ADDRESS_KEPT_FIELDS = ("use", "type", "state", "country", "postalCode")
PATIENT_FIELDS = ("subject", "patient", "beneficiary")
# Strings that are not free text: a unit, a code system's version, an element's own id (the pseudonymiser's
# floor; a source's `keep_free_text` adds to it)
KEPT_STRINGS = frozenset(
    {
        *(f"{t}.unit" for t in ("Quantity", "Age", "Count", "Distance", "Duration", "MoneyQuantity", "SimpleQuantity")),
        "Coding.version",
        *("QuestionnaireItem.linkId", "QuestionnaireResponseItem.linkId", "QuestionnaireItemEnableWhen.question"),
        *("ParametersParameter.name", "BundleLink.relation", "BundleEntryResponse.status"),
    }
)
PSEUDONYMISED_TAG = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "PSEUDED",
    "display": "pseudonymized",
}
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
MASKED = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "masked"}]}
MASKED_EXTENSION = {"url": DATA_ABSENT_REASON, "valueCode": "masked"}
MASKED_PRIMITIVE = {"extension": [MASKED_EXTENSION]}
MASKED_TEXT = "masked"  # what a required choice of free text (`contentString`) holds instead
# a number kept as written (`formats/numbers.py`) is an `orjson.Fragment`
_STRINGS, _NUMBERS, _BOOLEANS = frozenset({str}), frozenset({int, float, orjson.Fragment}), frozenset({bool})
# why something was removed, as counted per batch
UNEXPECTED_SHAPE, IDENTIFYING_VALUE = "unexpected shape", "identifying value"
# what the shortcuts through References, Codings and CodeableConcepts log, as the walk of their tables would
_REFERENCE_DISPLAY, _CODING_DISPLAY = (FREE_TEXT, "Reference.display"), (FREE_TEXT, "Coding.display")
_CONCEPT_TEXT = (FREE_TEXT, "CodeableConcept.text")

REFERENCE = re.compile(
    r"^(?P<base>(?:https?://[^?#]*/)?)(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?P<history>/_history/[A-Za-z0-9\-.]{1,64})?\Z"
)
URN_OID = re.compile(r"^urn:oid:[0-2](\.(0|[1-9][0-9]*))+\Z")
CONDITIONAL_REFERENCE = re.compile(r"^(?P<type>[A-Z][A-Za-z]{1,63})\?(?P<query>.+)$")


@dataclass(slots=True)
class Pseudonymised:
    """What the warehouse needs beside the rewritten resource (made for every resource: not frozen, whose
    initialiser costs twice as much)."""

    resource_id: str
    # the person pseudonym: a linking identifier's token when the Patient has one, else the Patient's token
    patient_id: str | None


class ResourcePseudonymiser:
    """Applies a source's privacy policy to a parsed resource, in place (the caller owns the dict)."""

    def __init__(
        self,
        tokeniser: Tokeniser | MicrosoftCompatTokeniser,
        policy: PrivacyPolicy | None = None,
        *,
        date_shifter: DateShifter | None = None,
        reference_year: int | None = None,
    ) -> None:
        self.tokens = tokeniser
        self.policy = policy or PrivacyPolicy()
        self.date_shifter = date_shifter
        self.reference_year = reference_year or date.today().year
        self._linking = self.policy.linking_identifiers
        self._plan = plan.compile_plan(
            frozenset(self.policy.keep_free_text), DROPPED_FIELDS, DROPPED_TYPES, KEPT_STRINGS
        )
        self._identifying_codes = plan.identifying_codes()
        self._systems, self._system_prefixes, self._excluded_prefixes = plan.trusted_code_systems()
        self._trusted: dict[Any, bool] = {}
        # (reason, `Type.element`) of each removal since the last `take_removed`: appended as the walk goes (a list
        # append costs less than counting in a dict on the hot path), counted when taken
        self.removed: list[tuple[str, str]] = []
        self._log = self.removed.append
        # a reference is rewritten the same way each time, and the same ones come back (a patient, a practitioner)
        self.rewrite_reference = lru_cache(maxsize=1 << 14)(self.rewrite_reference)
        # a patient's resources name the same subject, so a reference is parsed once for it too
        self._patient_token = lru_cache(maxsize=1 << 14)(self._patient_token)
        # the shorter ways through `element_plan.SHORTCUT_TYPES`, by a spec's `shortcut`
        self._shortcuts = (None, self._scrub_plain_reference, self._scrub_plain_coding, self._scrub_plain_concept)

    def pseudonymise(self, resource: dict[str, Any]) -> Pseudonymised:
        resource_type = resource["resourceType"]
        resource_id = self.tokens.own_id(resource_type, resource["id"])
        if resource_type == "Patient":
            patient_token = resource_id
            person_id = self._linking_token(resource) or resource_id
        else:
            patient_token = person_id = self._patient_of(resource)
        fields = self._plan.resources.get(resource_type)
        if fields is None:  # not an R4 resource type: nothing of it is understood, so nothing is kept
            for key in [k for k in resource if k not in ("resourceType", "id")]:
                del resource[key]
            self._count(UNEXPECTED_SHAPE, "(not an R4 resource type)")
        else:
            self._scrub(resource, fields)
            if resource_type == "Observation":
                self._mask_identifying_values(resource)
        resource["id"] = resource_id
        if self.date_shifter is not None and patient_token is not None:
            self.date_shifter.shift(resource, self.date_shifter.offset_days(patient_token))
        birth_date = resource.get("birthDate")
        if isinstance(birth_date, str):
            resource["birthDate"] = generalise_birth_date(
                birth_date, precision=self.policy.birth_date_precision, reference_year=self.reference_year
            )
        meta = resource.setdefault("meta", {})
        meta.setdefault("security", []).append(PSEUDONYMISED_TAG)
        return Pseudonymised(resource_id, person_id)

    def take_removed(self) -> dict[tuple[str, str], int]:
        """What was removed since the last call, by (reason, `Type.element`); the counts start again."""
        removed, self.removed = self.removed, []
        self._log = self.removed.append
        return dict(Counter(removed))

    def rewrite_reference(self, reference: str) -> str:
        """`Type/id`, absolute URLs and `_history` keep their shape; anything unparsed becomes a token."""
        if reference.startswith("#"):
            return "#" + self.tokens.contained_id(reference[1:]) if len(reference) > 1 else reference
        match = REFERENCE.match(reference)
        if match:
            token = self.tokens.resource_id(match["type"], match["id"])
            history = match["history"] or ""
            return f"{match['base']}{match['type']}/{token}{history}"
        if reference.startswith("urn:uuid:"):
            return "urn:uuid:" + self.tokens.uuid("urn-uuid", reference[9:].lower())
        if URN_OID.match(reference):
            return "urn:oid:" + self.tokens.token("urn-oid", reference[8:])
        conditional = CONDITIONAL_REFERENCE.match(reference)
        if conditional:
            query = "&".join(self._rewrite_search_parameter(p) for p in conditional["query"].split("&"))
            return f"{conditional['type']}?{query}"
        return "urn:pseudonym:" + self.tokens.token("reference", reference)

    # --- implementation details ---------------------------------------------------------------

    def _linking_token(self, patient: dict[str, Any]) -> str | None:
        """The first linking identifier, in the policy's order of preference."""
        identifiers = {
            i.get("system"): i.get("value")
            for i in patient.get("identifier", ())
            if isinstance(i, dict) and isinstance(i.get("value"), str) and isinstance(i.get("system", ""), str)
        }
        for system in self._linking:
            if identifiers.get(system):
                return self.tokens.identifier(system, identifiers[system])
        return None

    def _patient_of(self, resource: dict[str, Any]) -> str | None:
        for field_name in PATIENT_FIELDS:
            value = resource.get(field_name)
            if isinstance(value, dict):
                token = self._patient_token(value.get("reference") or "")
                if token is not None:
                    return token
        return None

    def _patient_token(self, reference: str) -> str | None:
        """The Patient's token when `reference` is a literal reference to a Patient."""
        match = REFERENCE.match(reference)
        return self.tokens.resource_id("Patient", match["id"]) if match and match["type"] == "Patient" else None

    def _rewrite_search_parameter(self, parameter: str) -> str:
        name, _, value = parameter.partition("=")
        if name == "identifier" and "|" in value:
            system, _, identifier = value.rpartition("|")
            return f"identifier={system}|{self.tokens.identifier(system, identifier)}"
        return f"{name}=" + self.tokens.token("search-parameter", parameter)

    def _scrub(self, node: dict[str, Any], fields: Fields) -> None:
        """Walk one element by its FHIR type: one lookup per key; what the type does not define, or holds in a
        shape its definition does not allow, is removed and counted, never passed through. The most frequent
        actions are tested first, and References, Codings and CodeableConcepts of their usual shape take a shorter
        way (this walk is most of the pseudonymise stage's time)."""
        removed: list[str] | None = None
        added: dict[str, Any] | None = None
        for key, value in node.items():
            try:
                spec = fields[key]  # a subscript costs less than a call to get, on every key of every element
            except KeyError:
                removed = _adding(removed, key)
                self._count(UNEXPECTED_SHAPE, f"{plan.type_name(fields)}.(unknown element)")  # never the key
                continue
            action = spec[0]
            if action == KEEP_ONE:
                if type(value) is str:
                    continue
                removed = _adding(removed, key)
                self._count(UNEXPECTED_SHAPE, spec[3])
                continue
            kind = type(value)
            if action == COMPLEX_ONE:
                if kind is dict:
                    shortcut = spec[6]
                    if not shortcut or not self._shortcuts[shortcut](value):
                        self._scrub(value, spec[1])
                    if value:
                        continue
                else:
                    self._count(UNEXPECTED_SHAPE, spec[3])
                removed = _adding(removed, key)
                continue
            if action == COMPLEX_LIST:
                if kind is list:
                    child = spec[1]
                    shortcut = self._shortcuts[spec[6]]
                    index = 0
                    for item in value:
                        if type(item) is not dict:
                            break
                        if shortcut is None or not shortcut(item):  # what a shortcut takes stays, never empty
                            self._scrub(item, child)
                            if not item:
                                break
                        index += 1
                    else:
                        if value:
                            continue
                    kept = self._rest_of_items(value, index, child, spec[3]) if value else None
                    if kept:
                        node[key] = kept
                        continue
                else:
                    self._count(UNEXPECTED_SHAPE, spec[3])
                removed = _adding(removed, key)
                continue
            if action == TEXT and not spec[4]:  # optional free text, whatever its shape
                removed = _adding(removed, key)
                self._log(spec[5])
                continue
            if action == KEEP:  # a list of strings (a resource's profiles)
                if kind is list and value:
                    for item in value:
                        if type(item) is not str:
                            break
                    else:
                        continue
                if not (kind is list and self._primitives_are(value, spec[3], _STRINGS)):
                    removed = _adding(removed, key)
                    self._count(UNEXPECTED_SHAPE, spec[3])
                continue
            if action == DISPLAY:
                trusted = self._trusted.get(node.get("system"))
                if trusted is None:
                    trusted = self._is_trusted(node.get("system"))
                if kind is not str or not trusted:
                    removed = _adding(removed, key)
                    self._log(spec[5] if kind is str else (UNEXPECTED_SHAPE, spec[3]))
                continue
            if action == LITERAL_REFERENCE:
                if kind is str:
                    node[key] = self.rewrite_reference(value)
                else:
                    removed = _adding(removed, key)
                    self._log((UNEXPECTED_SHAPE, spec[3]))
                continue
            _, child, is_list, label, required, _, _ = spec
            if action == IDENTIFIER_VALUE:
                system = node.get("system")
                if system is not None and type(system) is not str:  # its tokens' domain would be an object's text
                    raise RecordProblem("invalid_identifier", "an identifier's system is not a string")
                if kind is str:
                    node[key] = self.tokens.identifier(system or "", value)
                else:
                    removed = _adding(removed, key)
                    self._count(UNEXPECTED_SHAPE, label)
            elif action in (NUMBER, BOOLEAN):
                kinds = _NUMBERS if action == NUMBER else _BOOLEANS
                good = kind is list and self._primitives_are(value, label, kinds) if is_list else kind in kinds
                if not good:
                    removed = _adding(removed, key)
                    self._count(UNEXPECTED_SHAPE, label)
            elif action == DROP:
                removed = _adding(removed, key)
            elif action == REFERENCE_DISPLAY:
                removed = _adding(removed, key)  # a Reference's display is usually a person's name
                if type(node.get("reference")) is str or type(node.get("identifier")) is dict:
                    self._log(spec[5])
                else:
                    self._log((UNEXPECTED_SHAPE, label))  # a display without a reference: a name, alone
                    if "extension" not in node:
                        added = added or {}
                        added["extension"] = [MASKED_EXTENSION]  # the Reference stays, saying it was masked
            elif action in (TEXT, OBSERVATION_TEXT):
                removed = _adding(removed, key)
                self._log(spec[5])
                if action == OBSERVATION_TEXT:
                    if "dataAbsentReason" not in node:
                        added = added or {}
                        added["dataAbsentReason"] = MASKED
                elif required == CHOICE:
                    # a required choice (`content[x]`): the only value that stays valid in every validator
                    node[key] = MASKED_TEXT
                    removed.pop()
                elif required and not is_list:
                    added = added or {}
                    added["_" + key] = MASKED_PRIMITIVE  # a required element says why it is absent
            elif action in (EXTENSION, SUB_EXTENSION):
                kept = self._scrub_extensions(value, child, label, action == EXTENSION) if kind is list else None
                if kept is not value:
                    if kept:
                        node[key] = kept
                    else:
                        removed = _adding(removed, key)
            elif action == ADDRESS:
                kept = self._generalise_addresses(value, is_list, label) if (kind is list) is is_list else None
                if kept:
                    node[key] = kept
                else:
                    removed = _adding(removed, key)
            elif action == PRIMITIVE_EXT:
                if not self._scrub_primitive_extension(value, label):
                    removed = _adding(removed, key)
            elif action == CONTAINED:
                kept = [c for c in value if self._scrub_resource(c, label, contained=True)] if kind is list else None
                if kept:
                    node[key] = kept
                else:
                    removed = _adding(removed, key)
            elif action == NESTED_RESOURCE and (is_list or not self._scrub_resource(value, label, contained=False)):
                removed = _adding(removed, key)
        if removed:
            for key in removed:
                del node[key]
        if added:
            node.update(added)

    def _scrub_plain_reference(self, reference: dict[str, Any]) -> bool:
        """A Reference of a literal reference and perhaps a display (removed, whatever its shape), walked as
        `_scrub` would; False, and the Reference untouched, for any other."""
        literal = reference.get("reference")
        if type(literal) is not str:
            return False
        size = len(reference)
        if size == 1:
            reference["reference"] = self.rewrite_reference(literal)
            return True
        if size == 2 and "display" in reference:
            reference["reference"] = self.rewrite_reference(literal)
            del reference["display"]
            self._log(_REFERENCE_DISPLAY)
            return True
        return False

    def _scrub_plain_coding(self, coding: dict[str, Any]) -> bool:
        """A Coding of the usual shape (`_is_plain_coding`) walked as `_scrub` would; False, and the Coding
        untouched, for any other."""
        if not _is_plain_coding(coding):
            return False
        self._keep_trusted_display(coding)
        return True

    def _scrub_plain_concept(self, concept: dict[str, Any]) -> bool:
        """A CodeableConcept of Codings of the usual shape and perhaps a text (removed, whatever its shape), walked
        as `_scrub` would; False, and the concept untouched, for any other."""
        codings = concept.get("coding")
        if type(codings) is not list or not codings or len(concept) != 1 + ("text" in concept):
            return False
        for coding in codings:
            if type(coding) is not dict or not _is_plain_coding(coding):
                return False
        for coding in codings:
            self._keep_trusted_display(coding)
        if len(concept) == 2:
            del concept["text"]
            self._log(_CONCEPT_TEXT)
        return True

    def _keep_trusted_display(self, coding: dict[str, Any]) -> None:
        """A plain Coding's display goes unless its system is trusted."""
        if len(coding) == 3:
            system = coding["system"]
            trusted = self._trusted.get(system)
            if trusted is None:
                trusted = self._is_trusted(system)
            if not trusted:
                del coding["display"]
                self._log(_CODING_DISPLAY)

    def _rest_of_items(self, items: list, index: int, child: Fields, label: str) -> list:
        """A list of complex elements whose item at `index` (scrubbed when it is a dict) is to go: the items
        before it, and those after it scrubbed; an item that is not an element (a nested list) is counted."""
        kept = items[:index]
        for position in range(index, len(items)):
            item = items[position]
            if type(item) is dict:
                if position > index:
                    self._scrub(item, child)
                if item:
                    kept.append(item)
            else:
                self._count(UNEXPECTED_SHAPE, label)
        return kept

    def _primitives_are(self, values: list, label: str, kinds: frozenset) -> bool:
        """Whether a list of primitives has its JSON type; items of another type are dropped and counted."""
        kept = [v for v in values if type(v) in kinds]
        if len(kept) != len(values):
            self._count(UNEXPECTED_SHAPE, label)
            values[:] = kept
        return bool(kept)

    def _scrub_extensions(self, extensions: list, child: Fields, label: str, allow_listed: bool) -> list:
        """Extensions outside the allow-list go (sub-extensions of an allowed one stay); each is walked as an
        Extension, and one left with neither a value nor sub-extensions goes too."""
        kept = []
        for extension in extensions:
            if type(extension) is not dict or type(extension.get("url")) is not str:
                self._count(UNEXPECTED_SHAPE, label)
                continue
            if allow_listed and extension["url"] not in ALLOWED_EXTENSIONS:
                continue
            self._scrub(extension, child)
            if len(extension) > 1:
                kept.append(extension)
        return extensions if len(kept) == len(extensions) else kept

    def _scrub_primitive_extension(self, value: Any, label: str) -> bool:
        """`_field` beside a primitive: an id and extensions (a list of them, nulls included, for a list)."""
        element = self._plan.element
        if type(value) is dict:
            self._scrub(value, element)
            return bool(value)
        if type(value) is not list:
            self._count(UNEXPECTED_SHAPE, label)
            return False
        kept = False
        for index, item in enumerate(value):
            if type(item) is dict:
                self._scrub(item, element)
                kept = kept or bool(item)
            elif item is not None:
                value[index] = None
                self._count(UNEXPECTED_SHAPE, label)
        return kept

    def _scrub_resource(self, resource: Any, label: str, *, contained: bool) -> bool:
        """A resource inside another (contained, a Bundle entry, a parameter): its id tokenised, walked by its
        own type; one of no R4 type is removed."""
        fields = self._plan.resources.get(resource.get("resourceType")) if type(resource) is dict else None
        if fields is None:
            self._count(UNEXPECTED_SHAPE, label)
            return False
        own_id = resource.get("id")
        if type(own_id) is str:
            if contained:
                resource["id"] = self.tokens.contained_id(own_id)
            else:
                resource["id"] = self.tokens.resource_id(resource["resourceType"], own_id)
        self._scrub(resource, fields)
        if resource["resourceType"] == "Observation":
            self._mask_identifying_values(resource)
        return True

    def _mask_identifying_values(self, observation: dict[str, Any]) -> None:
        """An Observation (or component) coded as an address, a name, a phone number...: its value goes, whatever
        its type, and the element says it is masked."""
        for element in [observation, *(c for c in observation.get("component", ()) if type(c) is dict)]:
            code = element.get("code")
            codings = code.get("coding") if type(code) is dict else None
            if not codings or not any(
                type(c) is dict and (c.get("system"), c.get("code")) in self._identifying_codes for c in codings
            ):
                continue
            values = [k for k in element if k.startswith(("value", "_value"))]
            owner = "Observation" if element is observation else "ObservationComponent"
            for key in values:
                del element[key]
                self._count(IDENTIFYING_VALUE, f"{owner}.{key}")
            if values:
                element.setdefault("dataAbsentReason", MASKED)

    def _is_trusted(self, system: Any) -> bool:
        """Whether a Coding's display is its code system's own text (LOINC, SNOMED CT...), not a person's."""
        trusted = self._trusted.get(system)
        if trusted is None:
            trusted = type(system) is str and (
                system in self._systems
                or (system.startswith(self._system_prefixes) and not system.startswith(self._excluded_prefixes))
            )
            if len(self._trusted) < 4096:
                self._trusted[system if type(system) is str else None] = trusted
        return trusted

    def _count(self, reason: str, label: str) -> None:
        self._log((reason, label))

    def _generalise_addresses(self, value: Any, is_list: bool, label: str) -> Any:
        """Only the use, type, state, country and a generalised postal code of each address stay."""
        kept = []
        for address in value if is_list else [value]:
            if type(address) is not dict:
                self._count(UNEXPECTED_SHAPE, label)
                continue
            generalised = {k: address[k] for k in ADDRESS_KEPT_FIELDS if type(address.get(k)) is str}
            if "postalCode" in generalised:
                postal_code = generalise_postal_code(generalised["postalCode"], generalised.get("country"))
                if postal_code is None:
                    del generalised["postalCode"]
                else:
                    generalised["postalCode"] = postal_code
            if generalised:
                kept.append(generalised)
        return kept if is_list else (kept[0] if kept else None)


def _is_plain_coding(coding: dict[str, Any]) -> bool:
    """Whether a Coding is a system, a code and perhaps a display, all strings, as nearly all are."""
    size = len(coding)
    return (
        (size == 2 or (size == 3 and type(coding.get("display")) is str))
        and type(coding.get("system")) is str
        and type(coding.get("code")) is str
    )


def _adding(keys: list[str] | None, key: str) -> list[str]:
    """`keys` with `key` added: the walk makes a list of keys to remove only for an element that loses one."""
    if keys is None:
        return [key]
    keys.append(key)
    return keys
