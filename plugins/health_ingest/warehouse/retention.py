"""Retention: raw data (landing copies, quarantine records) is purged after a configurable time, and each purge
is recorded in `ingest.purges`."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from health_ingest import config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurgeReport:
    cutoff: datetime
    landing_folders: int
    quarantine_records: int


def retention_days() -> int:
    return config.retention_days()


def purge_raw_data(conn, *, older_than: timedelta, landing_root: Path | None = None) -> PurgeReport:
    """Remove batch landing folders and quarantine records older than the cutoff; never a batch still loading."""
    cutoff = datetime.now(UTC) - older_than
    landing_root = landing_root or config.state_dir() / "landing"
    with conn.cursor() as cur:
        cur.execute("SELECT batch_id::text FROM ingest.batches WHERE status = 'loading'")
        loading = {row[0] for row in cur.fetchall()}
    removed = 0
    for folder in sorted(landing_root.glob("*/*")) if landing_root.exists() else []:
        if folder.is_dir() and folder.name not in loading and _modified(folder) < cutoff:
            shutil.rmtree(folder)
            removed += 1
    with conn.cursor() as cur:
        cur.execute("DELETE FROM ingest.quarantine WHERE quarantined_at < %s", (cutoff,))
        quarantined = cur.rowcount
        cur.execute(
            "INSERT INTO ingest.purges (what, cutoff, items) VALUES ('landing', %s, %s), ('quarantine', %s, %s)",
            (cutoff, removed, cutoff, quarantined),
        )
    conn.commit()
    log.info(
        "retention: purged %d landing folders and %d quarantine records older than %s",
        removed,
        quarantined,
        cutoff.isoformat(timespec="seconds"),
    )
    return PurgeReport(cutoff, removed, quarantined)


def _modified(folder: Path) -> datetime:
    return datetime.fromtimestamp(folder.stat().st_mtime, UTC)
