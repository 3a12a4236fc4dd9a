"""Land a delivery: copy its files into the ingestion zone, checksum each, and name what each holds."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from health_ingest.errors import DeliveryError
from health_ingest.formats.ndjson import is_ndjson, resource_type_of

READY_MARKER = "_READY"
CHUNK = 1 << 20


@dataclass(frozen=True)
class LandedFile:
    file_no: int
    name: str
    path: Path
    bytes: int
    sha256: str
    resource_type: str | None

    @property
    def skip_reason(self) -> str | None:
        if self.resource_type is None:
            return "file name does not start with a FHIR resource type (e.g. Patient.000.ndjson)"
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

    @property
    def loadable(self) -> list[LandedFile]:
        return [f for f in self.files if f.resource_type is not None]


def land_fhir_delivery(delivery: Path, landing_folder: Path) -> LandedDelivery:
    """Copy the NDJSON files of a delivery (a folder or one file); other files are left where they are."""
    delivery = delivery.resolve()
    if delivery.is_dir():
        candidates = sorted(p for p in delivery.iterdir() if p.is_file() and is_ndjson(p))
    elif delivery.is_file() and is_ndjson(delivery):
        candidates = [delivery]
    else:
        raise DeliveryError(f"{delivery}: no such delivery folder or NDJSON file")
    if not candidates:
        raise DeliveryError(f"{delivery}: holds no NDJSON file (*.ndjson, *.ndjson.gz)")
    landing_folder.mkdir(parents=True, exist_ok=False)
    files = []
    for file_no, source_file in enumerate(candidates, start=1):
        target = landing_folder / source_file.name
        size, sha256 = _copy_with_checksum(source_file, target)
        files.append(LandedFile(file_no, source_file.name, target, size, sha256, resource_type_of(source_file)))
    return LandedDelivery(delivery, landing_folder, files)


# --- implementation details -------------------------------------------------------------------


def _copy_with_checksum(source: Path, target: Path) -> tuple[int, str]:
    """One read of the source serves both the copy and the digest; the copy is private (0600)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(source, "rb") as reader, os.fdopen(fd, "wb") as writer:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    shutil.copystat(source, target, follow_symlinks=True)
    os.chmod(target, 0o600)
    return size, digest.hexdigest()
