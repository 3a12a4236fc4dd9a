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

    def __post_init__(self) -> None:
        if isinstance(self.strict, dict):
            object.__setattr__(self, "strict_rules", StrictRules(**self.strict))
            object.__setattr__(self, "strict", True)
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError("tolerance must be in [0, 1)")
        object.__setattr__(self, "downgrade", tuple(self.downgrade))

    def apply(self, outcomes: list) -> list:
        """The outcomes with this source's downgrades marked."""
        for outcome in outcomes:
            if outcome.category in self.downgrade or outcome.expectation["type"] in self.downgrade:
                outcome.downgraded = not outcome.success and outcome.expectation["meta"]["severity"] == "error"
        return outcomes
