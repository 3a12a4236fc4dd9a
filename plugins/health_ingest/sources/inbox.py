"""A source's inbox: deliveries are sub-folders, and a marker file written last says one is complete.

`_READY` (written by the sender) -> `_QUEUED` (seen by the triggerer) -> `_DONE` (committed).
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

READY = "_READY"
QUEUED = "_QUEUED"
DONE = "_DONE"

# words a delivery folder's name may hold and still be shown: an export's usual vocabulary, nothing personal
DELIVERY_WORDS = {"delivery", "export", "extract", "batch", "part", "run", "bulk", "full", "incremental", "daily"}


def pending_deliveries(inbox: Path) -> list[Path]:
    """Deliveries that are complete and not yet committed, oldest marker first."""
    if not inbox.is_dir():
        return []
    found = []
    for folder in inbox.iterdir():
        if folder.is_dir() and not (folder / DONE).exists():
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


def delivery_label(folder: str | Path) -> str:
    """The name a delivery is shown by (task names in the UI, logs): its folder's name when made only of digits,
    separators and an export's usual words (`2026-12-01`, `export-0042`), else `delivery-<time it was marked
    ready>`: a sender may name a folder after a patient."""
    folder = Path(folder)
    words = [w for w in re.split(r"[-_.:]+", folder.name) if w and not re.fullmatch(r"\d+(T\d+Z?)?", w)]
    shown = len(folder.name) <= 64 and re.fullmatch(r"[A-Za-z0-9_.:-]+", folder.name)
    if shown and all(w.lower() in DELIVERY_WORDS for w in words):
        return folder.name
    marker = next((folder / m for m in (QUEUED, READY, DONE) if (folder / m).exists()), folder)
    try:
        stamp = datetime.fromtimestamp(marker.stat().st_mtime, UTC).strftime("%Y%m%dT%H%M%SZ")
    except OSError:
        stamp = "unknown"
    return f"delivery-{stamp}"
