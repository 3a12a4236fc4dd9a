"""Compatibility with Microsoft's FHIR anonymiser, for users migrating from it: the same hashes, the same references.

Its cryptoHash is HMAC-SHA256 keyed with the key's UTF-8 bytes, in lowercase hex, over the bare value: no
identifier-system domain, no key id, hence no rotation. Use it to keep joins with data already anonymised that
way; new data should use the native tokens.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache


class MicrosoftCompatTokeniser:
    """The `Tokeniser` interface, answered with Microsoft-compatible hashes."""

    hashes_contained_ids = True

    def __init__(self, key: str) -> None:
        key_bytes = key.encode("utf-8")
        self.key_id = "microsoft-compat"

        @lru_cache(maxsize=1 << 14)
        def crypto_hash(value: str) -> str:
            return hmac.new(key_bytes, value.encode("utf-8"), hashlib.sha256).hexdigest()

        self.crypto_hash = crypto_hash

    def token(self, domain: str, value: str) -> str:
        return self.crypto_hash(value)

    def resource_id(self, resource_type: str, resource_id: str) -> str:
        return self.crypto_hash(resource_id)

    own_id = resource_id

    def identifier(self, system: str, value: str) -> str:
        return self.crypto_hash(value)

    def uuid(self, domain: str, value: str) -> str:
        return self.crypto_hash(value)

    def contained_id(self, value: str) -> str:
        return self.crypto_hash(value)

    def drain_new_tokens(self) -> list:
        return []
