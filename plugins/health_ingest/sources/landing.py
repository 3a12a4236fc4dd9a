"""Land a delivery: copy its files into the ingestion zone, checksum each, and name what each holds."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from health_ingest.deliveries import LandedDelivery, LandedFile
from health_ingest.errors import DeliveryError
from health_ingest.formats.bundles import explode_bundle, index_bundles
from health_ingest.formats.ndjson import is_ndjson, resource_type_in, resource_type_of
from health_ingest.formats.resource_types import RESOURCE_TYPES

READY_MARKER = "_READY"
EXPORT_RECORD = "_export.json"  # a pulled export's record: its manifest's files, as downloaded
EXPORT_WORDS = {"log", "error", "errors", "deleted", "output"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
CHUNK = 1 << 20
SENDFILE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV})


def land_fhir_delivery(delivery: Path, landing_folder: Path) -> LandedDelivery:
    """Copy the NDJSON files and FHIR Bundles (`*.json`) of a delivery (a folder or one file); other files are left
    where they are. Bundles are unpacked into one NDJSON file per resource type, checksummed like the rest."""
    delivery = delivery.resolve()
    candidates = _candidates(delivery, _is_input, _entries, "NDJSON file or Bundle")
    if not candidates and not _empty_export(delivery):
        raise DeliveryError("the delivery holds no NDJSON file (*.ndjson, *.ndjson.gz) and no Bundle (*.json)")
    with _landing(landing_folder):
        return LandedDelivery(delivery, landing_folder, _land_fhir_files(candidates, landing_folder))


def _land_fhir_files(candidates: list[Path], landing_folder: Path) -> list[LandedFile]:
    files: list[LandedFile] = []
    digests = _Digests()
    for source_file in candidates:
        target = landing_folder / source_file.name
        size = _private_copy(source_file, target, safe_label(source_file.name, len(files) + 1))
        bundle, role = _is_bundle(source_file), _role(source_file)
        # what a file holds is read from its first record: servers name files anyhow
        resource_type = resource_type_in(target) if not bundle and role == "resources" else None
        file_no = len(files) + 1
        label = safe_label(source_file.name, file_no)
        files.append(LandedFile(file_no, label, target, size, digests.of(target), resource_type, bundle, role=role))
    bundles = [f for f in files if f.unpacked]
    if bundles:
        entries = landing_folder / "entries"
        entries.mkdir(mode=0o700)
        index = index_bundles([(f.path, f.name) for f in bundles])
        for bundle in bundles:
            for derived in explode_bundle(bundle.path, bundle.name, index, entries):
                files.append(
                    LandedFile(
                        len(files) + 1,
                        derived.name,
                        derived,
                        derived.stat().st_size,
                        digests.of(derived),
                        resource_type_of(derived),
                        derived_from=bundle.name,
                    )
                )
    digests.close()
    return files


# --- implementation details -------------------------------------------------------------------


def land_files(
    delivery: Path, landing_folder: Path, accepts: Callable[[Path], bool], holds: Callable[[Path], str], *, what: str
) -> LandedDelivery:
    """Copy and checksum the files of a delivery that `accepts` takes; `holds` names what each holds (a table). A
    folder's sub-folders are part of it: an extract published as one folder per product (SNDS `DCIR/`,
    `PMSI/PMSI MCO/`...) is one delivery, as a flat folder is."""
    delivery = delivery.resolve()
    candidates = _candidates(delivery, accepts, _files_of_tree, what)
    if not candidates:
        raise DeliveryError(f"the delivery holds no {what}")
    kinds = {path: holds(path) for path in candidates}  # refuses an unknown table before anything is copied
    files = []
    digests = _Digests()
    landed_names: set[str] = set()
    with _landing(landing_folder):
        for file_no, source_file in enumerate(candidates, start=1):
            # two folders of a tree may hold files of one name: the second is landed under its number
            landed_name = source_file.name if source_file.name not in landed_names else f"{file_no}-{source_file.name}"
            landed_names.add(landed_name)
            target = landing_folder / landed_name
            # a file named after a known table is an export's name, not a person's
            plain = SAFE_NAME.match(source_file.name) and len(source_file.name) <= 80
            name = source_file.name if plain else safe_label(source_file.name, file_no)
            size = _private_copy(source_file, target, name)
            files.append(LandedFile(file_no, name, target, size, digests.of(target), kinds[source_file]))
    digests.close()
    return LandedDelivery(delivery, landing_folder, files)


def _candidates(
    delivery: Path,
    accepts: Callable[[Path], bool],
    listed: Callable[[Path, Callable[[Path], bool]], list[Path]],
    what: str,
) -> list[Path]:
    """The input files of a delivery: those `listed` finds in a folder, or the file itself if `accepts` takes it."""
    if delivery.is_dir():
        return listed(delivery, accepts)
    if delivery.is_file() and accepts(delivery):
        return [delivery]
    # the delivery's name is the sender's (a patient's, sometimes): never said
    raise DeliveryError(f"the delivery is no folder, {what} that can be read")


def _files_of_tree(folder: Path, accepts: Callable[[Path], bool]) -> list[Path]:
    """The files of a folder and its sub-folders, in path order; names starting with `_` or `.` (markers, a
    pulled export's record, hidden files and folders) are never input."""
    found = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(f for f in folders if not f.startswith(("_", ".")))
        for name in names:
            path = Path(root) / name
            # not only regular files: a link, a device or a FIFO is refused when it is opened (`_open_regular`)
            if not name.startswith(("_", ".")) and not path.is_dir() and accepts(path):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def safe_label(file_name: str, file_no: int) -> str:
    """The file's name when it is an export's usual name (`Patient.000.ndjson`, `1.Encounter.ndjson.gz`,
    `Patient1.ndjson`, `patient_0.ndjson.gz`, `log.ndjson`), else `file-<n>` with its suffix: a delivered name
    (`Jane_Doe_<patient id>.json`, a hash that may be an id) may itself identify someone."""
    suffixes = file_name.partition(".")[2]
    words = [w for w in re.split(r"[._\-]", file_name) if w.lower() not in {"ndjson", "jsonl", "json", "gz", "from"}]
    known = all(w.isdigit() or _TYPE_WORD.fullmatch(w) or w.lower() in EXPORT_WORDS or w == "file" for w in words)
    if known and len(file_name) <= 80 and SAFE_NAME.match(file_name):
        return file_name
    suffix = "." + suffixes if suffixes and SAFE_NAME.match(suffixes) else ""
    return f"file-{file_no:03d}{suffix}"


_TYPE_WORD = re.compile(f"(?i:{'|'.join(sorted(RESOURCE_TYPES, key=len, reverse=True))})[0-9]*")


def _empty_export(delivery: Path) -> bool:
    """A pulled export whose manifest listed no file: nothing changed since `_since` (a quiet day). Its batch
    commits empty and moves `_since` on."""
    record = delivery / EXPORT_RECORD
    if not delivery.is_dir() or not record.is_file():
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("files") == []
    except (ValueError, AttributeError):
        return False


def _role(path: Path) -> str:
    """An export's `deleted` and `error` files, by the names the Bulk Data client gives them."""
    first = path.name.split(".")[0].lower()
    return first if first in {"deleted", "error"} and is_ndjson(path) else "resources"


def _is_input(path: Path) -> bool:
    """Names starting with `_` are the pipeline's own (markers, a pulled export's record), never input."""
    return not path.name.startswith("_") and (is_ndjson(path) or _is_bundle(path))


def _is_bundle(path: Path) -> bool:
    return path.name.lower().endswith(".json")


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()  # through one reused buffer


class _Digests:
    """SHA-256 of landed copies, one after the other on a thread of their own: the batch starts reading at once,
    and the digests are awaited by its last writes. Hashing releases the interpreter's lock."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="landing-digest")

    def of(self, path: Path) -> Future[str]:
        return self._executor.submit(file_sha256, path)

    def close(self) -> None:
        self._executor.shutdown(wait=False)  # what was submitted still runs


def _entries(delivery: Path, accepts: Callable[[Path], bool]) -> list[Path]:
    """The input files of a delivery folder by name; what each is, is judged when it is opened (`_open_regular`),
    so that a file swapped for a link in between is still refused."""
    return sorted(p for p in delivery.iterdir() if accepts(p) and not p.is_dir())


def _open_regular(source: Path, label: str) -> int:
    """A descriptor of a regular file inside its folder: no symbolic link is followed (one may point at the
    process environment or a key), and no device, FIFO or socket is read (which could block or never end)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DeliveryError(f"{label}: a symbolic link; a delivery holds regular files only") from None
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        what = (
            "a FIFO"
            if stat.S_ISFIFO(kind)
            else "a device"
            if stat.S_ISCHR(kind) or stat.S_ISBLK(kind)
            else "not a file"
        )
        raise DeliveryError(f"{label}: {what}; a delivery holds regular files only")
    return fd


class _landing:
    """The batch's landing folder, private to the pipeline's user (0700: file names can identify someone); when
    landing fails (a refused file, a full disk), the partial copy is removed and the error says so."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> Path:
        created = False
        try:
            self.folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.folder.mkdir(mode=0o700)
            created = True
            os.chmod(self.folder, 0o700)  # whatever the umask
        except OSError as error:  # a disk so full that not even the folder fits
            if created:
                shutil.rmtree(self.folder, ignore_errors=True)
            raise landing_failed(error, self.folder) from None
        return self.folder

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, DeliveryError):
            raise landing_failed(error, self.folder) from None


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(error: BaseException) -> bool:
    """No space (or no quota) left where the error was met."""
    return isinstance(error, OSError) and error.errno in DISK_FULL


def free_space(folder: Path) -> str:
    """What is free on the disk of the folder (or of its nearest existing parent), in words."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return "free space unknown"
    free, size = (blocks * stats.f_frsize / (1 << 20) for blocks in (stats.f_bavail, stats.f_blocks))
    return f"{free:.1f} MiB free of {size:.1f} MiB"


def landing_failed(error: OSError, folder: Path) -> DeliveryError:
    """The error of a landing that failed on the file system, after its partial copy was removed. A full disk may
    have room again later (a purge, another batch's copy removed): a retry can help. A delivered file's name is
    never said (`strerror` only, not the error's file name)."""
    if disk_full(error):
        return DeliveryError(
            "landing the delivery failed: no space left on the landing zone's disk; the partial copy was removed "
            f"({free_space(folder)} on that disk now)",
            retryable=True,
        )
    return DeliveryError(f"landing the delivery failed: {error.strerror}; the partial copy was removed")


def _private_copy(source: Path, target: Path, label: str) -> int:
    """A private copy (0600) made by the kernel; its digest is taken from the copy: what is loaded is what was
    hashed."""
    source_fd = _open_regular(source, label)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(source_fd, "rb") as reader, os.fdopen(fd, "wb") as writer:
        try:
            offset = 0
            while sent := os.sendfile(writer.fileno(), reader.fileno(), offset, 1 << 30):
                offset += sent
        except OSError as error:  # a file system without sendfile between files: copy through this process
            if error.errno not in SENDFILE_UNSUPPORTED:
                raise  # a full disk, an I/O error: copying another way would fail the same, later
            reader.seek(0)
            writer.seek(0)
            writer.truncate()
            shutil.copyfileobj(reader, writer, CHUNK)
    times = os.stat(source, follow_symlinks=False)
    os.utime(target, ns=(times.st_atime_ns, times.st_mtime_ns))
    os.chmod(target, 0o600)
    return target.stat().st_size
