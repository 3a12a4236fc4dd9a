"""What a source's quality gate does, from the `quality:` block of its entry in the sources file."""

from __future__ import annotations

from dataclasses import dataclass, field

from health_ingest.quality.strict import StrictRules


@dataclass(frozen=True)
class QualityPolicy:
    # share of bad values every map expectation tolerates (0.005 = 0.5 %), on top of the suite's own `mostly`
    tolerance: float = 0.0
    # validate every resource against the FHIR model (fhir.resources) in the worker processes: true, or the
    # options of StrictRules ({security_checks: false, html_in_markdown: false, example_urls: false, ...})
    strict: bool | dict = False
    # run the suites of expectations/ as a gate; off only for sources that are not patient records
    # (terminology, conformance fixtures), where clinical plausibility does not apply
    suites: bool = True
    # Kahn categories or expectation types whose errors this source records as warnings: for extracts whose
    # values are generated column by column (synthetic data), never to hide a real source's faults
    downgrade: tuple[str, ...] = ()
    strict_rules: StrictRules = field(default_factory=StrictRules)
    # share of a file's (or of a whole resource type's or table's) records quarantined above which the batch is
    # rejected instead of committed: a file mostly unreadable is a broken delivery, not a few bad records
    quarantine_ceiling: float = 0.5
    # per resource type or claims table, overriding `quarantine_ceiling` (1.0 never rejects)
    quarantine_ceiling_by_type: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.strict, dict):
            object.__setattr__(self, "strict_rules", StrictRules(**self.strict))
            object.__setattr__(self, "strict", True)
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError("tolerance must be in [0, 1)")
        object.__setattr__(self, "downgrade", tuple(self.downgrade))
        ceilings = {"quarantine_ceiling": self.quarantine_ceiling, **dict(self.quarantine_ceiling_by_type)}
        for name, ceiling in ceilings.items():
            if not isinstance(ceiling, int | float) or not 0.0 <= ceiling <= 1.0:
                raise ValueError(f"{name}: a quarantine ceiling is a share in [0, 1]")

    def ceiling_for(self, resource_type: str) -> float:
        return float(self.quarantine_ceiling_by_type.get(resource_type, self.quarantine_ceiling))

    def apply(self, outcomes: list) -> list:
        """The outcomes with this source's downgrades marked."""
        for outcome in outcomes:
            if outcome.category in self.downgrade or outcome.expectation["type"] in self.downgrade:
                outcome.downgraded = not outcome.success and outcome.expectation["meta"]["severity"] == "error"
        return outcomes
