"""`health-ingest keys`: pseudonymisation keyrings and SMART signing keys (never prints key material)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from health_ingest import config


def add_commands(commands) -> None:
    keys = commands.add_parser("keys", help="pseudonymisation keys (never prints key material)")
    key_actions = keys.add_subparsers(title="actions")
    new = key_actions.add_parser("new", help="write a new keyring file with one random key")
    new.add_argument("--keyring", required=True)
    new.set_defaults(run=cmd_keys_new)
    rotate = key_actions.add_parser("rotate", help="add a fresh key and make it the active one")
    rotate.add_argument("--keyring", required=True)
    rotate.set_defaults(run=cmd_keys_rotate)
    jwks = key_actions.add_parser("jwks", help="a key pair for SMART Backend Services; prints the public JWKS")
    jwks.add_argument("--out", required=True, help="where to write the private key (PEM, mode 0600)")
    jwks.add_argument("--alg", choices=["RS384", "ES384"], default="RS384")
    jwks.set_defaults(run=cmd_keys_jwks)
    listing = key_actions.add_parser("list", help="key ids of a keyring")
    listing.add_argument("--keyring")
    listing.set_defaults(run=cmd_keys_list)


def cmd_keys_new(args: argparse.Namespace) -> int:
    from health_ingest.privacy.keyring import new_keyring_file

    path = Path(args.keyring)
    if _refuse_overwrite(path):
        return 2
    keyring = new_keyring_file(path)
    print(f"wrote {path} (mode 0600) with active key {keyring.active_id}; set {config.ENV_KEYRING}={path}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from health_ingest.privacy.keyring import rotate_keyring_file

    keyring = rotate_keyring_file(Path(args.keyring))
    print(f"{args.keyring}: new active key {keyring.active_id}; earlier keys kept: {len(keyring.keys) - 1}")
    print("new batches use it now; 'health-ingest warehouse rekey --to-key ...' re-pseudonymises older ones")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from health_ingest.privacy.keyring import load_keyring, read_keyring_file

    keyring = read_keyring_file(Path(args.keyring)) if args.keyring else load_keyring()
    for key_id, key in sorted(keyring.keys.items()):
        flags = [f for f, on in (("active", key_id == keyring.active_id), ("demo", key.demo)) if on]
        print(f"{key_id}  {len(key.secret) * 8}-bit  {' '.join(flags)}")
    return 0


def cmd_keys_jwks(args: argparse.Namespace) -> int:
    """A signing key pair for SMART Backend Services: the private key to a 0600 file, the public JWKS printed."""
    import json

    from health_ingest.sources.bulk.auth import new_signing_key

    path = Path(args.out)
    if _refuse_overwrite(path):
        return 2
    pem, jwks = new_signing_key(args.alg)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    print(json.dumps(jwks, indent=2))
    print(
        f"private key written to {path} (mode 0600): put it in the password of the source's Airflow connection, "
        f'with extra {{"auth": "smart-backend-services", "client_id": ..., "alg": "{args.alg}", '
        f'"kid": "{jwks["keys"][0]["kid"]}"}}; register the JWKS above with the server',
        file=sys.stderr,
    )
    return 0


# --- implementation details -------------------------------------------------------------------


def _refuse_overwrite(path: Path) -> bool:
    """Key files are never overwritten: True (and a message) when one is already there."""
    if path.exists():
        print(f"error: {path} exists; keys are never overwritten", file=sys.stderr)
        return True
    return False
