"""Keyed, irreversible pseudonyms: HMAC-SHA256 with one domain per identifier system, encoded as FHIR ids."""

from __future__ import annotations

import hashlib
import uuid
from binascii import b2a_base64
from functools import lru_cache

from health_ingest.privacy.keyring import Keyring

TOKEN_PURPOSE = "identifier-tokens"
# URL-safe base64 with "_" spelled ".": the FHIR id alphabet [A-Za-z0-9-.]
_ID_ALPHABET = bytes.maketrans(b"+/", b"-.")


def keyed_sha256(key: bytes):
    """HMAC-SHA256 (RFC 2104) under one key, its padded-key blocks hashed once: each message then costs its own
    hashing only (a token per reference is the batch path's most frequent operation)."""
    block = key.ljust(64, b"\0") if len(key) <= 64 else hashlib.sha256(key).digest().ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def mac(message: bytes) -> bytes:
        hashed = inner.copy()
        hashed.update(message)
        result = outer.copy()
        result.update(hashed.digest())
        return result.digest()

    return mac


class Tokeniser:
    """Maps (domain, value) to `<key id>.<43 characters of the HMAC>`: at most 55 characters, a valid FHIR id."""

    def __init__(self, keyring: Keyring, *, id_space: str, record_new: bool = False) -> None:
        self.key_id = keyring.active_id
        self.id_space = id_space
        key = keyring.subkey(TOKEN_PURPOSE)
        prefix = self.key_id + "."
        # (domain, original, token) of tokens computed since the last drain, for the escrow
        self.new_tokens: list[tuple[str, str, str]] | None = [] if record_new else None
        new_tokens = self.new_tokens

        mac_of = keyed_sha256(key)

        def compute(domain: str, value: str) -> str:
            mac = mac_of(f"{domain}\x1f{value}".encode())
            # one translation drops the padding and the line break, where `urlsafe_b64encode`, `rstrip` and
            # `replace` took three passes (computed for every resource's own id)
            result = prefix + b2a_base64(mac).translate(_ID_ALPHABET, b"=\n").decode()
            if new_tokens is not None:
                new_tokens.append((domain, value, result))
            return result

        @lru_cache(maxsize=1 << 12)
        def token_uuid(domain: str, value: str) -> str:
            mac = mac_of(f"{domain}\x1f{value}".encode())
            return str(uuid.UUID(bytes=mac[:16], version=4))

        self.token = lru_cache(maxsize=1 << 14)(compute)
        self._uncached = compute
        self.uuid = token_uuid

    def resource_id(self, resource_type: str, resource_id: str) -> str:
        """Resource ids are tokenised within the source's id space, per resource type."""
        return self.token(f"resource|{self.id_space}|{resource_type}", resource_id)

    def own_id(self, resource_type: str, resource_id: str) -> str:
        """A resource's own id, as `resource_id` gives it. Met once per delivery, it is computed without the cache,
        where it would only push out the references that do come back."""
        return self._uncached(f"resource|{self.id_space}|{resource_type}", resource_id)

    def drain_new_tokens(self) -> list[tuple[str, str, str]]:
        if self.new_tokens is None:
            return []
        drained = list(self.new_tokens)
        self.new_tokens.clear()
        return drained

    def contained_id(self, value: str) -> str:
        """Contained resources' ids are local to their container, but a sender may name them after anyone
        (`#mother-jane`): tokenised too, the same way in the resource and in its `#` references."""
        return self.token("contained", value)

    def identifier(self, system: str, value: str) -> str:
        """Identifier values are tokenised per system, so the same SSN links across sources."""
        return self.token(f"identifier|{system}", value)
