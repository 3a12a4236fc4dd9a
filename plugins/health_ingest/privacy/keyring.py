"""Pseudonymisation keys: kept outside the warehouse and the repository, each with an id stored on every batch."""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from health_ingest import config
from health_ingest.errors import KeyringError

log = logging.getLogger(__name__)

KEY_ID = re.compile(r"^[a-z0-9]{1,11}$")
MIN_SECRET_BYTES = 32
DEMO_KEYRING_NAME = "keyring.demo.json"
KEYRING_CONN_ID = config.KEYRING_CONN_ID


@dataclass(frozen=True)
class MasterKey:
    key_id: str
    secret: bytes = field(repr=False)
    demo: bool = False


@dataclass(frozen=True)
class Keyring:
    keys: dict[str, MasterKey] = field(repr=False)
    active_id: str

    @property
    def active(self) -> MasterKey:
        return self.keys[self.active_id]

    def subkey(self, purpose: str, key_id: str | None = None, *, length: int = 32) -> bytes:
        """An independent key per purpose (HKDF-SHA256), so one leaked subkey exposes nothing else."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        master = self.keys[key_id or self.active_id]
        info = f"health-ingest/{purpose}".encode()
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master.secret)


def load_keyring(path: Path | None = None) -> Keyring:
    """The configured keyring; outside demo mode a missing, short or demo key is refused."""
    configured = path or (Path(os.environ[config.ENV_KEYRING]) if os.environ.get(config.ENV_KEYRING) else None)
    if configured is None and (document := _airflow_keyring_document()) is not None:
        keyring = parse_keyring(document, f"Airflow connection {KEYRING_CONN_ID}")
        if keyring.active.demo and not config.demo_mode():
            raise KeyringError(f"Airflow connection {KEYRING_CONN_ID}: the active key is a demo key")
        return keyring
    if configured is None:
        if not config.demo_mode():
            raise KeyringError(
                f"no pseudonymisation keyring: set {config.ENV_KEYRING} to a keyring file "
                f"(create one with 'health-ingest keys new --keyring FILE'), or {config.ENV_DEMO}=1 for a demo"
            )
        return _demo_keyring()
    keyring = read_keyring_file(configured)
    if keyring.active.demo and not config.demo_mode():
        raise KeyringError(f"{configured}: the active key is a demo key; refusing outside demo mode")
    return keyring


def read_keyring_file(path: Path) -> Keyring:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyringError(f"{path}: keyring file not found") from None
    except (OSError, ValueError) as error:
        raise KeyringError(f"{path}: unreadable keyring ({type(error).__name__})") from None
    return parse_keyring(document, str(path))


def parse_keyring(document: dict, path: str) -> Keyring:
    """Validate a keyring document; `path` only names where it came from in errors."""
    keys: dict[str, MasterKey] = {}
    for entry in document.get("keys", []):
        key_id = str(entry.get("id", ""))
        if not KEY_ID.match(key_id):
            raise KeyringError(f"{path}: key id '{key_id}' must match {KEY_ID.pattern}")
        try:
            secret = base64.b64decode(entry["secret"], validate=True)
        except (KeyError, ValueError):
            raise KeyringError(f"{path}: key '{key_id}' has no valid base64 secret") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyringError(f"{path}: key '{key_id}' is shorter than {MIN_SECRET_BYTES} bytes")
        keys[key_id] = MasterKey(key_id, secret, demo=bool(entry.get("demo", False)))
    active = document.get("active")
    if active not in keys:
        raise KeyringError(f"{path}: the active key '{active}' is not in the keyring")
    return Keyring(keys=keys, active_id=active)


def new_keyring_file(path: Path, *, demo: bool = False) -> Keyring:
    """Write a keyring holding one fresh random key (mode 0600); never over an existing file (FileExistsError).
    The file appears whole: it is written beside its place, then linked there, so that a process reading it never
    sees half a keyring, and of two writers at once one wins and the other is told the file exists."""
    entry = _new_key_entry(_new_key_id(), demo=demo)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _written_beside(path, {"active": entry["id"], "keys": [entry]}) as whole:
        os.link(whole, path)  # atomic, and never over an existing file
    return read_keyring_file(path)


def rotate_keyring_file(path: Path) -> Keyring:
    """Add a fresh key and make it active; older keys stay, for re-keying and for reading old batches. Rotations
    of one file take turns (a lock beside it), so that two at once both add their key: a key lost after a batch
    used it would leave that batch's pseudonyms under a key nobody holds."""
    with _rotation_lock(path):
        document = json.loads(path.read_text(encoding="utf-8"))
        parse_keyring(document, str(path))
        key_id = _new_key_id(existing={k["id"] for k in document["keys"]})
        document["keys"].append(_new_key_entry(key_id, demo=False))
        document["active"] = key_id
        rotated = parse_keyring(document, str(path))
        with _written_beside(path, document) as whole:
            os.replace(whole, path)
    return rotated  # not read back after the lock: another rotation may already have followed


@contextmanager
def _written_beside(path: Path, document: dict) -> Iterator[str]:
    """A whole copy of `document` on disk beside `path` (mode 0600, a name of its own), removed after the block
    unless the block moved it into place."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        yield temporary
    finally:
        with suppress(FileNotFoundError):
            os.unlink(temporary)


@contextmanager
def _rotation_lock(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _new_key_id(existing: set[str] = frozenset()) -> str:
    while (key_id := "k" + datetime.now(UTC).strftime("%y%m%d") + secrets.token_hex(2)) in existing:
        pass
    return key_id


def _new_key_entry(key_id: str, *, demo: bool) -> dict:
    return {
        "id": key_id,
        "secret": base64.b64encode(secrets.token_bytes(MIN_SECRET_BYTES)).decode(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "demo": demo,
    }


def _airflow_keyring_document() -> dict | None:
    """The keyring JSON kept in the password (or extra) of the Airflow connection, when there is one."""
    connection = config.connection(KEYRING_CONN_ID)
    if connection is None:
        return None
    try:
        return json.loads(connection.password or connection.extra or "")
    except ValueError:
        raise KeyringError(f"Airflow connection {KEYRING_CONN_ID}: password is not a keyring JSON") from None


def _demo_keyring() -> Keyring:
    """The state folder's demo key, made by the first batch that needs it. Batches of several sources often start
    together on a fresh state folder: each may find no key and make one; the first to link its file wins, and the
    others read that key, so that every batch pseudonymises with the same one."""
    path = config.state_dir() / DEMO_KEYRING_NAME
    try:
        keyring = read_keyring_file(path) if path.exists() else new_keyring_file(path, demo=True)
    except FileExistsError:
        keyring = read_keyring_file(path)
    log.warning(
        "DEMO MODE: pseudonyms use a generated demo key (%s) kept in the state folder. "
        "Never load real patient data this way.",
        keyring.active_id,
    )
    return keyring
