"""Rewrite one FHIR resource so that no direct identifier is left: allow-list extensions, tokens for ids."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Any

from health_ingest.errors import RecordProblem
from health_ingest.privacy.compat import MicrosoftCompatTokeniser
from health_ingest.privacy.dates import DateShifter
from health_ingest.privacy.generalise import generalise_birth_date, generalise_postal_code
from health_ingest.privacy.policy import PrivacyPolicy
from health_ingest.privacy.tokens import Tokeniser

# Fields that hold direct identifiers or free text about a person: removed wherever they appear.
DROPPED_FIELDS = frozenset({"telecom", "photo", "contact", "note", "comment", "patientInstruction"})

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

_DROP, _REFERENCE, _EXTENSION, _IDENTIFIER, _NAME, _ADDRESS, _NARRATIVE, _ATTACHMENT, _CONTAINED = (
    object() for _ in range(9)
)
_ACTIONS = {
    **dict.fromkeys(DROPPED_FIELDS, _DROP),
    "reference": _REFERENCE,
    "extension": _EXTENSION,
    "modifierExtension": _EXTENSION,
    "identifier": _IDENTIFIER,
    "name": _NAME,
    "address": _ADDRESS,
    "text": _NARRATIVE,
    "data": _ATTACHMENT,
    "url": _ATTACHMENT,
    "title": _ATTACHMENT,
    "contained": _CONTAINED,
}
PSEUDONYMISED_TAG = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "PSEUDED",
    "display": "pseudonymized",
}

REFERENCE = re.compile(
    r"^(?P<base>(?:https?://[^?#]*/)?)(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?P<history>/_history/[A-Za-z0-9\-.]{1,64})?\Z"
)
URN_OID = re.compile(r"^urn:oid:[0-2](\.(0|[1-9][0-9]*))+\Z")
CONDITIONAL_REFERENCE = re.compile(r"^(?P<type>[A-Z][A-Za-z]{1,63})\?(?P<query>.+)$")


@dataclass(frozen=True, slots=True)
class Pseudonymised:
    """What the warehouse needs beside the rewritten resource."""

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
        # a reference is rewritten the same way each time, and the same ones come back (a patient, a practitioner)
        self.rewrite_reference = lru_cache(maxsize=1 << 14)(self.rewrite_reference)

    def pseudonymise(self, resource: dict[str, Any]) -> Pseudonymised:
        resource_type = resource["resourceType"]
        resource_id = self.tokens.own_id(resource_type, resource["id"])
        if resource_type == "Patient":
            patient_token = resource_id
            person_id = self._linking_token(resource) or resource_id
        else:
            patient_token = person_id = self._patient_of(resource)
        self._scrub(resource)
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
                match = REFERENCE.match(value.get("reference") or "")
                if match and match["type"] == "Patient":
                    return self.tokens.resource_id("Patient", match["id"])
        return None

    def _rewrite_search_parameter(self, parameter: str) -> str:
        name, _, value = parameter.partition("=")
        if name == "identifier" and "|" in value:
            system, _, identifier = value.rpartition("|")
            return f"identifier={system}|{self.tokens.identifier(system, identifier)}"
        return f"{name}=" + self.tokens.token("search-parameter", parameter)

    def _scrub(self, node: dict[str, Any]) -> None:
        """Walk one element. Keys are looked up once in `_ACTIONS`; most keys need no action but descent."""
        removed = []
        for key, value in node.items():
            action = _ACTIONS.get(key)
            if action is None:
                kind = type(value)
                if kind is dict:
                    self._scrub(value)
                elif kind is list:
                    for item in value:
                        if type(item) is dict:
                            self._scrub(item)
            elif action is _DROP:
                removed.append(key)
            elif action is _REFERENCE:
                if type(value) is str:
                    node[key] = self.rewrite_reference(value)
                    if "display" in node:
                        removed.append("display")  # a Reference's display is usually a person's name
            elif action is _EXTENSION:
                kept = [e for e in value if type(e) is dict and e.get("url") in ALLOWED_EXTENSIONS]
                if kept:
                    node[key] = kept
                else:
                    removed.append(key)
            elif action is _IDENTIFIER:
                self._tokenise_identifiers(value)
                if type(value) is dict and "display" in node:
                    removed.append("display")  # a logical Reference: its display names someone
            elif action is _NAME:
                if type(value) is not str:
                    removed.append(key)  # HumanName (Patient, Practitioner...); organisation names are strings
            elif action is _ADDRESS:
                node[key] = self._generalise_addresses(value)
            elif action is _CONTAINED and type(value) is list:
                for contained in value:
                    if type(contained) is dict:
                        if type(contained.get("id")) is str:
                            contained["id"] = self.tokens.contained_id(contained["id"])
                        self._scrub(contained)
            elif action is _NARRATIVE and type(value) is dict and "div" in value:
                removed.append(key)  # rendered from the very fields removed here
            elif action is _ATTACHMENT and ("contentType" in node or (key == "data" and type(value) is str)):
                removed.append(key)  # attachment contents: a clinical note holds the patient's name
            elif type(value) is dict:
                self._scrub(value)
        for key in removed:
            node.pop(key, None)

    def _tokenise_identifiers(self, value: Any) -> None:
        for identifier in value if isinstance(value, list) else [value]:
            if not isinstance(identifier, dict):
                continue
            raw = identifier.get("value")
            if isinstance(raw, str):
                system = identifier.get("system", "")
                if type(system) is not str:  # its tokens' domain would be the text of an object
                    raise RecordProblem("invalid_identifier", "an identifier's system is not a string")
                identifier["value"] = self.tokens.identifier(system, raw)
            elif "value" in identifier:
                del identifier["value"]
            identifier.pop("assigner", None)
            identifier.pop("extension", None)

    def _generalise_addresses(self, value: Any) -> Any:
        addresses = value if isinstance(value, list) else [value]
        kept = []
        for address in addresses:
            if not isinstance(address, dict):
                continue
            generalised = {k: address[k] for k in ADDRESS_KEPT_FIELDS if k in address}
            if isinstance(generalised.get("postalCode"), str):
                postal_code = generalise_postal_code(generalised["postalCode"], address.get("country"))
                if postal_code is None:
                    del generalised["postalCode"]
                else:
                    generalised["postalCode"] = postal_code
            if generalised:
                kept.append(generalised)
        return kept if isinstance(value, list) else (kept[0] if kept else {})
