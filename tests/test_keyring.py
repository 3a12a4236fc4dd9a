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


def test_batches_starting_together_on_a_fresh_state_folder_share_one_demo_key(tmp_path, monkeypatch):
    """Batches of several sources start together on a fresh state folder, as threads of one process or as
    processes (Celery workers), and each finds no demo key: one makes it, the others read it whole. None fails on
    the file another made (FileExistsError), none reads half of it."""
    import multiprocessing
    import queue
    import threading

    def load(barrier, found) -> None:
        barrier.wait()
        try:
            found.put(load_keyring().active_id)
        except Exception as error:  # reported by the assertion below
            found.put(repr(error))

    fork = multiprocessing.get_context("fork")
    for trial in range(40):
        monkeypatch.setenv("HEALTH_INGEST_STATE", str(tmp_path / f"state-{trial}"))
        if trial % 2:
            barrier, found = fork.Barrier(4, timeout=30), fork.Queue()
            runners = [fork.Process(target=load, args=(barrier, found)) for _ in range(4)]
        else:
            barrier, found = threading.Barrier(4, timeout=30), queue.Queue()
            runners = [threading.Thread(target=load, args=(barrier, found)) for _ in range(4)]
        for runner in runners:
            runner.start()
        key_ids = [found.get(timeout=30) for _ in runners]
        for runner in runners:
            runner.join(timeout=30)
        assert len(set(key_ids)) == 1 and key_ids[0].startswith("k"), (trial, key_ids)
        stored = json.loads((tmp_path / f"state-{trial}" / "keyring.demo.json").read_text())
        assert stored["active"] == key_ids[0] and len(stored["keys"]) == 1
        assert [path.name for path in (tmp_path / f"state-{trial}").iterdir()] == ["keyring.demo.json"]


def test_rotations_of_one_keyring_at_once_each_add_their_key_and_none_is_lost(tmp_path):
    """Two operators (or a script run twice) rotating one keyring at the same moment: each rotation adds its key
    to what the other wrote, the file is always whole, and nothing is left beside it but its lock."""
    import multiprocessing

    from health_ingest.privacy.keyring import new_keyring_file, rotate_keyring_file

    path = tmp_path / "keyring.json"
    first = new_keyring_file(path)

    def rotate(barrier, made) -> None:
        barrier.wait()
        for _ in range(15):
            made.put(rotate_keyring_file(path).active_id)
            read_keyring_file(path)  # never half a file

    fork = multiprocessing.get_context("fork")
    barrier, made = fork.Barrier(3, timeout=30), fork.Queue()
    rotators = [fork.Process(target=rotate, args=(barrier, made)) for _ in range(3)]
    for rotator in rotators:
        rotator.start()
    added = [made.get(timeout=60) for _ in range(45)]
    for rotator in rotators:
        rotator.join(timeout=30)
        assert rotator.exitcode == 0

    keyring = read_keyring_file(path)
    assert len(set(added)) == 45, "a rotation returned a key another rotation added"
    assert set(keyring.keys) == {first.active_id, *added}
    assert keyring.active_id in added
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keyring.json.lock", "keyring.json"]
