"""Escrow for authorised re-identification: originals under AES-SIV, kept apart from the research tables.

AES-SIV is authenticated and deterministic: the same original gives the same ciphertext, so the escrow holds
one row per token, and tampering is detected on decryption. Its key is derived for this purpose only.
"""

from __future__ import annotations

from health_ingest.privacy.keyring import Keyring

ESCROW_PURPOSE = "escrow-aes-siv"


class EscrowCipher:
    def __init__(self, keyring: Keyring, key_id: str | None = None) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV

        self.key_id = key_id or keyring.active_id
        self._siv = AESSIV(keyring.subkey(ESCROW_PURPOSE, self.key_id, length=64))

    def encrypt(self, domain: str, original: str) -> bytes:
        return self._siv.encrypt(original.encode(), [domain.encode(), self.key_id.encode()])

    def decrypt(self, domain: str, ciphertext: bytes) -> str:
        return self._siv.decrypt(ciphertext, [domain.encode(), self.key_id.encode()]).decode()


def encode_escrow_rows(cipher: EscrowCipher, new_tokens: list[tuple[str, str, str]]) -> bytes:
    """COPY text rows (token, domain, ciphertext as bytea hex, key id) for the escrow staging table."""
    rows = []
    for domain, original, token in new_tokens:
        ciphertext = cipher.encrypt(domain, original).hex()
        rows.append(f"{token}\t{_text(domain)}\t\\\\x{ciphertext}\t{cipher.key_id}\n")
    return "".join(rows).encode()


def _text(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
