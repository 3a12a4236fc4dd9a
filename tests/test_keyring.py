"""Keys: refused when missing, short or demo outside demo mode; never printed."""

from __future__ import annotations

import base64
import json

import pytest
from health_ingest.cli import main
from health_ingest.errors import KeyringError
from health_ingest.privacy.keyring import load_keyring, read_keyring_file


def test_no_keyring_is_refused_outside_demo_mode(monkeypatch):
    monkeypatch.delenv("HEALTH_INGEST_DEMO")
    with pytest.raises(KeyringError, match="no pseudonymisation keyring"):
        load_keyring()


def test_short_and_demo_keys_are_refused(tmp_path, monkeypatch):
    short = tmp_path / "short.json"
    short.write_text(
        json.dumps({"active": "k1", "keys": [{"id": "k1", "secret": base64.b64encode(b"x" * 16).decode()}]})
    )
    with pytest.raises(KeyringError, match="shorter than 32 bytes"):
        read_keyring_file(short)

    demo = tmp_path / "demo.json"
    secret = base64.b64encode(b"y" * 32).decode()
    demo.write_text(json.dumps({"active": "k2", "keys": [{"id": "k2", "secret": secret, "demo": True}]}))
    monkeypatch.delenv("HEALTH_INGEST_DEMO")
    with pytest.raises(KeyringError, match="demo key"):
        load_keyring(demo)


def test_keys_new_and_list_never_print_key_material(tmp_path, capsys):
    path = tmp_path / "keyring.json"
    assert main(["keys", "new", "--keyring", str(path)]) == 0
    assert main(["keys", "list", "--keyring", str(path)]) == 0
    assert main(["keys", "new", "--keyring", str(path)]) == 2, "an existing keyring is never overwritten"
    output = capsys.readouterr()
    keyring = read_keyring_file(path)
    secret = keyring.active.secret
    for form in (base64.b64encode(secret).decode(), secret.hex()):
        assert form not in output.out + output.err
    assert keyring.active_id in output.out
    assert oct(path.stat().st_mode & 0o777) == "0o600"
