"""Verify step: what PostgreSQL staged must be exactly what the reader read, file by file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from health_ingest.errors import LoadError
from health_ingest.warehouse.staging import staging_table

if TYPE_CHECKING:
    from health_ingest.pipeline import FileCounts
    from health_ingest.sources.landing import LandedDelivery


def reconcile_staging(cur, batch_id: str, landed: LandedDelivery, file_counts: dict[int, FileCounts]) -> None:
    """Raise if any file's staged good or rejected rows differ from the reader's counts."""
    staged: dict[int, tuple[int, int]] = {}
    for resource_type in sorted({f.resource_type for f in landed.loadable}):
        cur.execute(
            f"""
            SELECT file_no, count(*) FILTER (WHERE reason IS NULL), count(*) FILTER (WHERE reason IS NOT NULL)
              FROM {staging_table(batch_id, resource_type)} GROUP BY file_no
            """
        )
        staged.update({file_no: (good, bad) for file_no, good, bad in cur.fetchall()})
    for landed_file in landed.loadable:
        counts = file_counts[landed_file.file_no]
        good, bad = staged.get(landed_file.file_no, (0, 0))
        if (good, bad) != (counts.rows_loaded, counts.rows_quarantined):
            raise LoadError(
                f"{landed_file.name}: read {counts.rows_loaded} good and {counts.rows_quarantined} bad records "
                f"but staged {good} and {bad}; the counts must reconcile"
            )
