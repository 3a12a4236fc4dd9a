"""What a landed delivery is: its files in the ingestion zone, what each holds, and what the reader counted in each.

The ground floor: the warehouse records these and the batch reads them, so neither imports the other's modules.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LandedFile:
    """`name` is what the warehouse, logs and messages show (see `safe_label`); `path` is the landing copy."""

    file_no: int
    name: str
    path: Path
    bytes: int
    digest: Future[str]  # the landed copy's SHA-256, computed while the batch reads it (see `sha256`)
    resource_type: str | None
    unpacked: bool = False  # a Bundle, whose entries were written to files derived from it
    derived_from: str | None = None
    role: str = "resources"  # or an export's "deleted" (Bundles of DELETE entries) or "error" (OperationOutcomes)

    @property
    def sha256(self) -> str:
        """Waits for the digest, which only the batch's last writes need."""
        return self.digest.result()

    @property
    def status(self) -> str:
        if self.role != "resources":
            return {"deleted": "deletions", "error": "errors"}[self.role]
        return "unpacked" if self.unpacked else "skipped" if self.skip_reason else "loaded"

    @property
    def skip_reason(self) -> str | None:
        if self.resource_type is None and not self.unpacked and self.role == "resources":
            return "holds no FHIR resource (no record with a resourceType among its first lines)"
        return None


@dataclass(frozen=True)
class LandedDelivery:
    source_path: Path
    folder: Path
    files: list[LandedFile]

    @property
    def input_sha256(self) -> str:
        """One digest for the whole delivery: the file names and their digests, in name order."""
        digest = hashlib.sha256()
        for landed in self.files:
            digest.update(f"{landed.name}\0{landed.sha256}\n".encode())
        return digest.hexdigest()

    def of_role(self, role: str) -> list[LandedFile]:
        return [f for f in self.files if f.role == role]

    @property
    def loadable(self) -> list[LandedFile]:
        """Patients first: the checks of the other types look up their patients' birth dates. Then the largest
        types: each type is merged once all its files are staged, so the batch ends on small ones."""
        files = [f for f in self.files if f.resource_type is not None]
        type_sizes: dict[str | None, int] = {}
        for landed in files:
            type_sizes[landed.resource_type] = type_sizes.get(landed.resource_type, 0) + landed.bytes
        return sorted(files, key=lambda f: (f.resource_type != "Patient", -type_sizes[f.resource_type], f.file_no))


@dataclass
class FileCounts:
    """What the reader saw in one file; each part of it is reconciled with what PostgreSQL staged."""

    rows_read: int = 0
    rows_quarantined: int = 0
    # of the quarantined, those only superseded by a later record of the same key in the delivery: not faults
    rows_superseded: int = 0

    @property
    def rows_loaded(self) -> int:
        return self.rows_read - self.rows_quarantined
