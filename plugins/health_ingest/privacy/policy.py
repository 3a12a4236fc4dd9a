"""What a source's pseudonymisation does, from the `privacy:` block of its entry in the sources file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyPolicy:
    """Per-source choices; the defaults are the strict ones."""

    # identifier systems whose token is the person pseudonym, so sources that share them join
    linking_identifiers: tuple[str, ...] = ()
    birth_date_precision: str = "year"  # year | month
    # 0: no date shift; N: every date of a patient moves by the same keyed offset in [-N, N] days
    date_shift_days: int = 0
    # keep the original identifiers, encrypted, for authorised re-identification (and re-keying)
    escrow: bool = False
    k_anonymity: int = 0  # 0: no gate; k: equivalence classes of patients smaller than k trip it
    k_anonymity_action: str = "warn"  # warn | reject
    # claims: provider identifiers (NPI, RPPS...) are kept, tokenised or dropped
    providers: str = "tokenise"
    # free text kept on purpose, by FHIR path (`Observation.valueString`, `Condition.code.text`, or a datatype's
    # element everywhere: `CodeableConcept.text`) or claims column (`table.COLUMN`); everything else is removed
    keep_free_text: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.birth_date_precision not in {"year", "month"}:
            raise ValueError("birth_date_precision must be 'year' or 'month'")
        if self.k_anonymity_action not in {"warn", "reject"}:
            raise ValueError("k_anonymity_action must be 'warn' or 'reject'")
        if self.providers not in {"keep", "tokenise", "drop"}:
            raise ValueError("providers must be 'keep', 'tokenise' or 'drop'")
        object.__setattr__(self, "keep_free_text", tuple(self.keep_free_text))
        if self.date_shift_days < 0 or self.k_anonymity < 0:
            raise ValueError("date_shift_days and k_anonymity must not be negative")
