"""Verify step: what PostgreSQL staged must be exactly what the reader read, part by part."""

from __future__ import annotations

from health_ingest.errors import LoadError


def reconcile_part(file_name: str, read: int, staged: int) -> None:
    """Raise unless PostgreSQL's own count of the rows a part's COPY staged is the reader's, good and rejected
    alike (a rejected record is staged with its reason, so that it reaches the quarantine)."""
    if staged != read:
        raise LoadError(f"{file_name}: {read} records read into a part but {staged} staged; the counts must reconcile")
