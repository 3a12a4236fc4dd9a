"""The quarantine ceiling: a batch whose files are mostly quarantined is rejected, not committed."""

from __future__ import annotations

from dataclasses import dataclass

from health_ingest.errors import BatchRejected
from health_ingest.quality.policy import QualityPolicy


@dataclass(frozen=True)
class FileQuarantine:
    """One file's counts, under the name the project shows for it (its relabelled name)."""

    label: str
    resource_type: str
    rows_read: int
    rows_quarantined: int  # unreadable or invalid: records superseded by a later one of their key are left out


def check_quarantine_ceiling(files: list[FileQuarantine], policy: QualityPolicy) -> None:
    """Reject when a file, or a whole resource type (or claims table), is quarantined above its ceiling.

    Every Patient of a delivery quarantined leaves its other resources pointing at nobody of this delivery:
    under the default ceiling (a half), such a Patient file always rejects."""
    breaches = []
    by_type: dict[str, list[int]] = {}
    for file in files:
        totals = by_type.setdefault(file.resource_type, [0, 0])
        totals[0] += file.rows_read
        totals[1] += file.rows_quarantined
        ceiling = policy.ceiling_for(file.resource_type)
        if file.rows_read and file.rows_quarantined / file.rows_read > ceiling:
            breaches.append(
                f"{file.label}: {file.rows_quarantined} of {file.rows_read} records quarantined "
                f"({file.rows_quarantined / file.rows_read:.0%}, ceiling {ceiling:.0%})"
            )
    named = {file.resource_type for file in files if any(b.startswith(f"{file.label}:") for b in breaches)}
    for resource_type, (read, quarantined) in sorted(by_type.items()):
        ceiling = policy.ceiling_for(resource_type)
        if read and quarantined / read > ceiling and resource_type not in named:
            breaches.append(
                f"{resource_type}: {quarantined} of {read} records quarantined over its files "
                f"({quarantined / read:.0%}, ceiling {ceiling:.0%})"
            )
    if breaches:
        raise BatchRejected("quarantine ceiling: " + "; ".join(breaches))
