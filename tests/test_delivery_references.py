"""A run names its deliveries to Airflow by label and keyed reference; the ingestion task finds each folder again."""

from __future__ import annotations

import dataclasses
import json

import pytest
from health_ingest.errors import ConfigurationError, DeliveryError
from health_ingest.sources.references import (
    EXPORTS,
    INBOX,
    found_delivery,
    given_delivery,
    keyed_delivery_name,
    resolve_delivery,
)

PERSON_NAMED = "Durand_Marie_1968"


@pytest.fixture
def source(tmp_path):
    from health_ingest.sources.registry import get_source

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return dataclasses.replace(get_source("smart_sample"), inbox=inbox, allowed_roots=(inbox,))


@pytest.fixture
def keyring(tmp_path):
    from health_ingest.privacy.keyring import new_keyring_file

    return new_keyring_file(tmp_path / "keyring.json")


def test_an_inbox_delivery_is_named_by_label_and_keyed_reference_and_found_again(source, keyring):
    for name in ("export-0041", PERSON_NAMED, "export-0042"):
        (source.inbox / name).mkdir()
        (source.inbox / name / "_READY").touch()

    named = found_delivery(source, source.inbox / PERSON_NAMED, INBOX, keyring)

    assert "Durand" not in json.dumps(named)
    assert named["label"].startswith("delivery-2") and named["where"] == INBOX
    assert named["ref"] == keyed_delivery_name(PERSON_NAMED, keyring, source), "the keyed label a batch stores"
    assert resolve_delivery(source, named, {}, keyring) == source.inbox / PERSON_NAMED
    usual = found_delivery(source, source.inbox / "export-0042", INBOX, keyring)
    assert usual["label"] == "export-0042"
    assert resolve_delivery(source, usual, {}, keyring) == source.inbox / "export-0042"


def test_a_reference_is_found_again_after_the_key_rotates_while_the_keyring_holds_its_key(source, keyring, tmp_path):
    from health_ingest.privacy.keyring import Keyring, rotate_keyring_file

    (source.inbox / PERSON_NAMED).mkdir()
    named = found_delivery(source, source.inbox / PERSON_NAMED, INBOX, keyring)

    rotated = rotate_keyring_file(tmp_path / "keyring.json")
    assert rotated.active_id != keyring.active_id
    assert resolve_delivery(source, named, {}, rotated) == source.inbox / PERSON_NAMED

    without = Keyring({rotated.active_id: rotated.active}, rotated.active_id)
    with pytest.raises(ConfigurationError, match="named under a key the keyring lacks") as refused:
        resolve_delivery(source, named, {}, without)
    assert "Durand" not in str(refused.value)


def test_a_delivery_gone_from_the_inbox_is_a_delivery_error_that_names_only_its_label(source, keyring):
    (source.inbox / PERSON_NAMED).mkdir()
    named = found_delivery(source, source.inbox / PERSON_NAMED, INBOX, keyring)
    (source.inbox / PERSON_NAMED).rename(source.inbox / "Durand_Marie_1969")

    with pytest.raises(DeliveryError, match=f"{named['label']} is no longer in its inbox folder") as missing:
        resolve_delivery(source, named, {}, keyring)
    assert "Durand" not in str(missing.value)
    with pytest.raises(DeliveryError):
        resolve_delivery(source, {**named, "where": EXPORTS}, {}, keyring)
    with pytest.raises(ConfigurationError, match="in no place this source has"):
        resolve_delivery(source, {**named, "where": "/elsewhere"}, {}, keyring)


def test_a_delivery_given_in_the_runs_conf_is_read_again_from_it_and_checked_again(source, keyring, tmp_path):
    folder = source.inbox / PERSON_NAMED
    folder.mkdir()
    given = given_delivery(folder)

    assert set(given) == {"label", "where"} and "Durand" not in json.dumps(given)
    assert resolve_delivery(source, given, {"delivery_path": str(folder)}, keyring) == folder
    with pytest.raises(ConfigurationError, match="outside the source's allowed roots"):
        resolve_delivery(source, given, {"delivery_path": str(tmp_path)}, keyring)
    with pytest.raises(ConfigurationError, match="which it lacks"):
        resolve_delivery(source, given, {}, keyring)


def test_a_pulling_sources_delivery_path_must_lie_in_its_exports_or_inbox_folder_too(tmp_path, monkeypatch):
    """A source that pulls `$export`s has no looser rule: by default, its own exports folder and its inbox."""
    from health_ingest.sources.registry import load_sources

    monkeypatch.setenv("HEALTH_INGEST_STATE", str(tmp_path / "state"))
    declared = tmp_path / "sources.yml"
    declared.write_text(
        "sources:\n"
        "  - name: hospital_a\n"
        "    kind: fhir\n"
        "    inbox: inbox/hospital_a\n"
        "    bulk: {url: 'https://fhir.hospital-a.example/r4', level: system}\n",
        encoding="utf-8",
    )
    source = load_sources(declared)["hospital_a"]
    pulled, dropped, elsewhere = source.exports / "export-0042", source.inbox / "2026-12-01", tmp_path / "elsewhere"
    for folder in (pulled, dropped, elsewhere):
        folder.mkdir(parents=True)

    assert source.allowed_roots == (source.inbox, source.exports)
    for folder in (pulled, dropped):
        assert resolve_delivery(source, given_delivery(folder), {"delivery_path": str(folder)}) == folder
    with pytest.raises(ConfigurationError, match="outside the source's allowed roots"):
        resolve_delivery(source, given_delivery(elsewhere), {"delivery_path": str(elsewhere)})
