"""Verify step: what PostgreSQL staged must be exactly what the reader read, file by file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from health_ingest.errors import LoadError

if TYPE_CHECKING:
    from health_ingest.pipeline import FileCounts
    from health_ingest.sources.landing import LandedDelivery


def staged_counts(cur, staged: str) -> dict[int, tuple[int, int]]:
    """Good and rejected rows per file number in a type's staging table, once it is final."""
    cur.execute(
        f"""
        SELECT file_no, count(*) FILTER (WHERE reason IS NULL), count(*) FILTER (WHERE reason IS NOT NULL)
          FROM {staged} GROUP BY file_no
        """
    )
    return {file_no: (good, bad) for file_no, good, bad in cur.fetchall()}


def reconcile_staging(landed: LandedDelivery, file_counts: dict[int, FileCounts], staged: dict[int, tuple]) -> None:
    """Raise if any file's staged good or rejected rows (`staged_counts` of every type) differ from the reader's."""
    for landed_file in landed.loadable:
        counts = file_counts[landed_file.file_no]
        good, bad = staged.get(landed_file.file_no, (0, 0))
        if (good, bad) != (counts.rows_loaded, counts.rows_quarantined):
            raise LoadError(
                f"{landed_file.name}: read {counts.rows_loaded} good and {counts.rows_quarantined} bad records "
                f"but staged {good} and {bad}; the counts must reconcile"
            )
