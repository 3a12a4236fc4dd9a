"""How a run names its deliveries to Airflow: by their label and a keyed reference, never by their folders' names.

A delivery's folder is named by its sender, sometimes after a patient, and Airflow keeps what a task returns (the
XCom table of its metadata database, the UI's XCom tab) and what a mapped task is given (its rendered fields). So
the task that finds a run's deliveries returns, for each, its label (`inbox.delivery_label`), where it is (the
source's inbox, or its exports folder for a pulled `$export`) and the keyed label of its folder's name (the one a
batch stores, `keyed_delivery_name`); the ingestion task finds the folder again there. A delivery given as the
run's `delivery_path` (the operator's own input, which Airflow keeps as the run's conf) is read again from the
run's parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from health_ingest.errors import ConfigurationError, DeliveryError
from health_ingest.privacy.keyring import Keyring, load_keyring
from health_ingest.sources.inbox import delivery_label
from health_ingest.sources.registry import Source

INBOX = "inbox"
EXPORTS = "exports"
GIVEN = "delivery_path"  # the run's own parameter


def keyed_delivery_name(name: str, keyring: Keyring, source: Source) -> str:
    """The keyed label of a folder's name (`<key id>.<HMAC>`): the same for the same name, source and key, and
    nothing of the name without the key."""
    from health_ingest.privacy.tokens import Tokeniser

    return Tokeniser(keyring, id_space=source.id_space).token("delivery-name", name)


def found_delivery(source: Source, folder: Path, where: str, keyring: Keyring | None = None) -> dict[str, str]:
    """A delivery of the source's inbox (`INBOX`) or exports folder (`EXPORTS`), as a run's XCom names it."""
    keyring = keyring or load_keyring()
    return {"label": delivery_label(folder), "where": where, "ref": keyed_delivery_name(folder.name, keyring, source)}


def given_delivery(folder: Path) -> dict[str, str]:
    """The delivery of the run's `delivery_path`, as a run's XCom names it: its label only."""
    return {"label": delivery_label(folder), "where": GIVEN}


def resolve_delivery(
    source: Source, delivery: dict[str, Any], params: dict[str, Any], keyring: Keyring | None = None
) -> Path:
    """The folder a run's XCom names: the run's `delivery_path` checked again, or the folder of the inbox or of the
    exports folder whose name has that keyed label (under the key that made it, while the keyring holds it)."""
    label = str(delivery.get("label") or "the delivery")
    where = delivery.get("where")
    if where == GIVEN:
        if not params.get("delivery_path"):
            raise ConfigurationError(f"source '{source.name}': {label} is the run's delivery_path, which it lacks")
        return source.allowed_delivery(params["delivery_path"])
    parent = {INBOX: source.inbox, EXPORTS: source.exports}.get(where)
    if parent is None:
        raise ConfigurationError(f"source '{source.name}': {label} is in no place this source has ({where!r})")
    keyring = keyring or load_keyring()
    key_id = str(delivery.get("ref") or "").partition(".")[0]
    if key_id not in keyring.keys:
        raise ConfigurationError(f"source '{source.name}': {label} was named under a key the keyring lacks")
    named_under = Keyring(keyring.keys, key_id)
    folders = sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    for folder in folders:
        if keyed_delivery_name(folder.name, named_under, source) == delivery["ref"]:
            return folder
    raise DeliveryError(f"source '{source.name}': {label} is no longer in its {where} folder")
