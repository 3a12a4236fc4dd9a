"""A source's inbox: deliveries are sub-folders, and a marker file written last says one is complete.

`_READY` (written by the sender) -> `_QUEUED` (seen by the triggerer) -> `_DONE` (committed), or set aside as
`_REJECTED` / `_FAILED` (holding the batch id) until an operator requeues or discards it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

READY = "_READY"
QUEUED = "_QUEUED"
DONE = "_DONE"
REJECTED = "_REJECTED"
FAILED = "_FAILED"
ASIDE = (REJECTED, FAILED)


@dataclass(frozen=True)
class SetAside:
    """A delivery taken out of the pending set: its status, the batch that decided it, and when."""

    folder: Path
    status: str  # rejected | failed
    batch_id: str
    since: datetime

    @property
    def label(self) -> str:
        return delivery_label(self.folder.name)


# words a delivery folder's name may hold and still be shown: an export's usual vocabulary, nothing personal
DELIVERY_WORDS = {"delivery", "export", "extract", "batch", "part", "run", "bulk", "full", "incremental", "daily"}


def pending_deliveries(inbox: Path) -> list[Path]:
    """Deliveries that are complete and not yet committed nor set aside, oldest marker first."""
    if not inbox.is_dir():
        return []
    found = []
    for folder in inbox.iterdir():
        if folder.is_dir() and not any((folder / m).exists() for m in (DONE, *ASIDE)):
            marker = next((folder / m for m in (QUEUED, READY) if (folder / m).exists()), None)
            if marker is not None:
                found.append((marker.stat().st_mtime, folder))
    return [folder for _, folder in sorted(found)]


def claim_next_ready(inbox: str) -> str | None:
    """Rename the oldest `_READY` to `_QUEUED` and return its delivery's name (None when nothing is ready)."""
    for folder in pending_deliveries(Path(inbox)):
        ready = folder / READY
        if ready.exists():
            try:
                os.replace(ready, folder / QUEUED)
            except FileNotFoundError:
                continue  # claimed by someone else meanwhile
            return folder.name
    return None


def mark_done(delivery: Path) -> None:
    """Only a committed batch marks its delivery done; a failed one stays pending for the next run."""
    for marker in (READY, QUEUED):
        (delivery / marker).unlink(missing_ok=True)
    (delivery / DONE).touch()


def set_aside(delivery: Path, status: str, batch_id: str | None) -> None:
    """A rejected delivery, or one that failed for good, leaves the pending set: later runs take only new ones."""
    marker = {"rejected": REJECTED, "failed": FAILED}[status]
    (delivery / marker).write_text((batch_id or "none") + "\n", encoding="utf-8")
    for pending in (READY, QUEUED):
        (delivery / pending).unlink(missing_ok=True)


def set_aside_deliveries(inbox: Path) -> list[SetAside]:
    """The inbox's set-aside deliveries, oldest first."""
    found = []
    if inbox.is_dir():
        for folder in inbox.iterdir():
            for marker in ASIDE:
                path = folder / marker
                if folder.is_dir() and path.exists():
                    since = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
                    batch_id = path.read_text(encoding="utf-8").strip()
                    found.append(SetAside(folder, marker.strip("_").lower(), batch_id, since))
    return sorted(found, key=lambda entry: entry.since)


def requeue(entry: SetAside) -> None:
    """After the sender's fix: the delivery is pending again, and its `_READY` wakes the source's DAG."""
    for marker in ASIDE:
        (entry.folder / marker).unlink(missing_ok=True)
    (entry.folder / READY).touch()


def discard(entry: SetAside) -> None:
    """The delivery will never be loaded: its raw files (which hold identifiers) are deleted from the inbox."""
    shutil.rmtree(entry.folder)


def says_nothing_of_a_person(name: str) -> bool:
    """A folder name made only of digits, separators and an export's usual words (`2026-12-01`, `export-0042`)."""
    words = [w for w in re.split(r"[-_.:]+", name) if w and not re.fullmatch(r"\d+(T\d+Z?)?", w)]
    shown = len(name) <= 64 and re.fullmatch(r"[A-Za-z0-9_.:-]+", name)
    return bool(shown) and all(w.lower() in DELIVERY_WORDS for w in words)


def delivery_label(folder: str | Path) -> str:
    """The name a delivery is shown by (task names in the UI, logs): its folder's name when made only of digits,
    separators and an export's usual words (`2026-12-01`, `export-0042`), else `delivery-<time it was marked
    ready>`: a sender may name a folder after a patient."""
    folder = Path(folder)
    if says_nothing_of_a_person(folder.name):
        return folder.name
    marker = next((folder / m for m in (QUEUED, READY, DONE) if (folder / m).exists()), folder)
    try:
        stamp = datetime.fromtimestamp(marker.stat().st_mtime, UTC).strftime("%Y%m%dT%H%M%SZ")
    except OSError:
        stamp = "unknown"
    return f"delivery-{stamp}"
