"""Re-identification gate: k-anonymity of the batch's patients over their quasi-identifiers, before commit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from health_ingest.errors import BatchRejected
from health_ingest.privacy.policy import PrivacyPolicy

log = logging.getLogger(__name__)

QUASI_IDENTIFIERS = {
    "birth date": "resource->>'birthDate'",
    "gender": "resource->>'gender'",
    "postal prefix": "resource#>>'{address,0,postalCode}'",
    "deceased": "(resource ? 'deceasedDateTime' OR resource->>'deceasedBoolean' = 'true')",
}


@dataclass(frozen=True)
class KAnonymityReport:
    k: int
    classes: int
    classes_below_k: int
    records_below_k: int
    action: str

    @property
    def passed(self) -> bool:
        return self.classes_below_k == 0


def check_k_anonymity(cur, batch_id: str, patient_staging: str, policy: PrivacyPolicy) -> KAnonymityReport | None:
    """Measure the staged patients; a report that trips a 'reject' policy raises `BatchRejected`.

    The report is recorded either way: in the load transaction when the batch goes on, and by the caller after
    the rollback when it is rejected (`BatchRejected.evidence`). Values are never reported, only counts.
    """
    if not policy.k_anonymity:
        return None
    columns = ", ".join(QUASI_IDENTIFIERS.values())
    cur.execute(
        f"""
        SELECT count(*), count(*) FILTER (WHERE n < %(k)s), coalesce(sum(n) FILTER (WHERE n < %(k)s), 0)
          FROM (SELECT count(*) AS n FROM {patient_staging} WHERE reason IS NULL GROUP BY {columns}) classes
        """,
        {"k": policy.k_anonymity},
    )
    classes, below, records = cur.fetchone()
    report = KAnonymityReport(policy.k_anonymity, classes, below, int(records), policy.k_anonymity_action)
    if report.passed or policy.k_anonymity_action == "warn":
        record_k_anonymity(cur, batch_id, report)
    if not report.passed:
        message = (
            f"k-anonymity: {below} of {classes} groups of patients sharing "
            f"{', '.join(QUASI_IDENTIFIERS)} are smaller than k={report.k} ({report.records_below_k} patients)"
        )
        if policy.k_anonymity_action == "reject":
            raise BatchRejected(message + "; the source's policy rejects such a batch", evidence=report)
        log.warning("%s; the source's policy only warns", message)
    return report


def record_k_anonymity(cur, batch_id: str, report: KAnonymityReport) -> None:
    cur.execute(
        """
        INSERT INTO ingest.privacy_checks (batch_id, check_name, quasi_identifiers, k, classes, classes_below_k,
                                           records_below_k, action, passed)
        VALUES (%s, 'k-anonymity', %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            batch_id,
            list(QUASI_IDENTIFIERS),
            report.k,
            report.classes,
            report.classes_below_k,
            report.records_below_k,
            report.action,
            report.passed,
        ),
    )
