"""The HL7 validator test cases (R4, JSON) with the reference validator's verdict and the options of each case.

A case's expected verdict is the reference validator's: rejected when its outcome holds an error. Cases whose
errors are all terminology or implementation-guide profile findings are out of strict mode's scope, by the rule of
`out_of_scope_finding`, applied to every issue of every outcome (never by case name).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

CASES = Path(__file__).parent / "data" / "hl7-fhir-test-cases"
TERMINOLOGY = re.compile(
    r"\bvalue ?set\b(?!\.)|\bcode ?system\b(?!\.)|\bdisplay\b|terminology|unknown code|not found in the|"
    r"is not in the|snomed|loinc|ucum|\bcode '[^']*' .*system|could not be validated",
    re.IGNORECASE,
)
# a profile named by its url (not an element called `profile`), its slices, its snapshot or differential
PROFILE = re.compile(r"\bprofile (?:https?://|')|\bslic(?:e|es|ing)\b|snapshot|differential|conform", re.IGNORECASE)
# a finding made against a later version of a definition than R4's (the extensions package of an implementation
# guide): `... v5.3.0-ballot is not allowed ...`
LATER_DEFINITION = re.compile(r"\bv(?!4\.0\.1\b)\d+\.\d+\.\d+")
CORE_CONTEXT = "http://hl7.org/fhir/StructureDefinition/"
SUPPORTED_URL = re.compile(r'<url value="([^"]+)"|"url"\s*:\s*"([^"]+)"')


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    errors: tuple[str, ...]  # the reference validator's error messages
    in_scope_errors: tuple[str, ...]
    options: dict

    @property
    def expected(self) -> str:
        return "quarantined" if self.errors else "loaded"

    @property
    def out_of_scope(self) -> bool:
        """Rejected by the reference only for terminology or profile findings."""
        return bool(self.errors) and not self.in_scope_errors


def out_of_scope_finding(issue: dict) -> bool:
    """Terminology (codes, displays, value-set bindings) and profiles other than the core's are out of scope."""
    text = (issue.get("details") or {}).get("text", "") or issue.get("diagnostics", "")
    if issue.get("code") in ("code-invalid",) or TERMINOLOGY.search(text):
        return True
    contexts = [e.get("valueString", "") for e in issue.get("extension", ()) if "issue-context" in e.get("url", "")]
    if any(c and not c.startswith(CORE_CONTEXT) for c in contexts) or LATER_DEFINITION.search(text):
        return True
    return bool(PROFILE.search(text)) and CORE_CONTEXT not in text


def options_of(entry: dict, folder: Path = CASES) -> dict:
    """Strict mode's options for a manifest entry, as the reference validator reads it: the extensions that the
    case's supporting definitions declare are known, as the reference loads them."""
    supporting = [folder / "validator" / name for name in entry.get("supporting", []) + entry.get("supporting5", [])]
    declared = [
        next(u for u in m if u) for p in supporting if p.exists() for m in SUPPORTED_URL.findall(p.read_text())[:1]
    ]
    return {
        "security_checks": bool(entry.get("security-checks", False)),
        "html_in_markdown": not entry.get("noHtmlInMarkdown", False),
        "example_urls": bool(entry.get("examples", True)),
        "allow_comments": bool(entry.get("allow-comments", False)),
        "known_extensions_only": True,  # the reference rejects extensions it cannot find
        "extension_domains": declared,  # and the core's and the cross-version extensions
    }


def load_cases(part: str = "visible") -> list[Case]:
    """`visible`: the cases of the suite's first extract; `held-out`: the other R4 JSON cases of the suite that
    need no package, profile or supporting file."""
    folder = CASES if part == "visible" else CASES / "held-out"
    cases = []
    for case in json.loads((folder / "INDEX.json").read_text()):
        entry = case["manifest_entry"]
        java = entry.get("java")
        outcome_file = case.get("outcome") or (Path(java).name if isinstance(java, str) else None)
        outcome_dir = folder / "outcomes"
        if not outcome_file or not (outcome_dir / outcome_file).exists():
            continue  # no reference verdict
        outcome = json.loads((outcome_dir / outcome_file).read_text())
        errors = [i for i in outcome.get("issue", ()) if i.get("severity") in ("error", "fatal")]
        in_scope = [i for i in errors if not out_of_scope_finding(i)]
        cases.append(
            Case(
                name=case["name"],
                raw=(folder / "validator" / case["file"]).read_bytes(),
                errors=tuple(_text(i) for i in errors),
                in_scope_errors=tuple(_text(i) for i in in_scope),
                options=options_of(entry, folder),
            )
        )
    return cases


def _text(issue: dict) -> str:
    return (issue.get("details") or {}).get("text", "") or issue.get("diagnostics", "")
