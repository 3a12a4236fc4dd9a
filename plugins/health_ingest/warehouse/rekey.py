"""Re-keying: re-pseudonymise the warehouse from one key to another, batch by batch, through the escrow.

Tokens are one-way, so a new key needs the originals: they come from the escrow (decrypted with the old key's
escrow key, tokenised and re-encrypted with the new one). Each batch is rewritten in its own transaction and
recorded on its row in `ingest.batches`; old tokens leave the escrow once no batch uses the old key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from psycopg2.extras import execute_values

from health_ingest.errors import HealthIngestError
from health_ingest.privacy.escrow import EscrowCipher
from health_ingest.privacy.keyring import Keyring
from health_ingest.privacy.tokens import Tokeniser

log = logging.getLogger(__name__)

TOKEN_BODY = r"\.[A-Za-z0-9\-.]{43}"


@dataclass
class RekeyReport:
    batches: int = 0
    rows: int = 0
    tokens: int = 0


def rekey_warehouse(conn, keyring: Keyring, to_key: str, progress: Callable[[str], None] | None = None) -> RekeyReport:
    """Move every committed batch under another key of the keyring to `to_key`."""
    if to_key not in keyring.keys:
        raise HealthIngestError(f"key '{to_key}' is not in the keyring")
    report = RekeyReport()
    with conn.cursor() as cur:
        cur.execute(
            "SELECT batch_id::text, key_id FROM ingest.batches WHERE status = 'committed' AND key_id <> %s "
            "ORDER BY commit_seq",
            (to_key,),
        )
        pending = cur.fetchall()
    conn.commit()
    new_tokens = Tokeniser(_with_active(keyring, to_key), id_space="")
    new_escrow = EscrowCipher(keyring, to_key)
    for batch_id, old_key in pending:
        if old_key not in keyring.keys:
            raise HealthIngestError(f"batch {batch_id} uses key '{old_key}', which is not in the keyring")
        mapper = _TokenMapper(conn, keyring, old_key, new_tokens, new_escrow, batch_id)
        with conn.cursor() as cur:
            rows = _rewrite_batch_rows(cur, batch_id, mapper)
            # the delivery's label was keyed with the old key and its folder name is kept nowhere: it goes
            cur.execute(
                "UPDATE ingest.batches SET key_id = %s, rekeyed_from = %s, rekeyed_at = now(), delivery = NULL "
                "WHERE batch_id = %s",
                (to_key, old_key, batch_id),
            )
        conn.commit()
        report.batches += 1
        report.rows += rows
        report.tokens += len(mapper.mapping)
        if progress:
            progress(f"batch {batch_id}: {rows} rows moved from key {old_key} to {to_key}")
    _retire_old_tokens(conn, to_key)
    return report


# --- implementation details -------------------------------------------------------------------


def _with_active(keyring: Keyring, key_id: str) -> Keyring:
    return Keyring(keys=keyring.keys, active_id=key_id)


class _TokenMapper:
    """Old token -> new token, through the escrow; also writes the new tokens' escrow rows."""

    def __init__(self, conn, keyring, old_key, new_tokens: Tokeniser, new_escrow: EscrowCipher, batch_id: str):
        self.conn, self.batch_id = conn, batch_id
        self.pattern = re.compile(re.escape(old_key) + TOKEN_BODY)
        self.old_escrow = EscrowCipher(keyring, old_key)
        self.new_tokens, self.new_escrow = new_tokens, new_escrow
        self.mapping: dict[str, str] = {}

    def prepare(self, texts: list[str]) -> None:
        wanted = {t for text in texts if text for t in self.pattern.findall(text)} - self.mapping.keys()
        if not wanted:
            return
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT token, domain, ciphertext FROM escrow.identifiers WHERE token = ANY(%s)", (list(wanted),)
            )
            found = cur.fetchall()
            missing = wanted - {row[0] for row in found}
            if missing:
                raise HealthIngestError(
                    f"batch {self.batch_id}: {len(missing)} tokens have no escrow entry (was the source loaded "
                    f"with escrow: true?), e.g. {sorted(missing)[0]}; nothing of this batch was re-keyed"
                )
            escrow_rows = []
            for token, domain, ciphertext in found:
                original = self.old_escrow.decrypt(domain, bytes(ciphertext))
                new = self.new_tokens.token(domain, original)
                self.mapping[token] = new
                escrow_rows.append((new, domain, self.new_escrow.encrypt(domain, original), self.new_escrow.key_id))
            execute_values(
                cur,
                "INSERT INTO escrow.identifiers (token, domain, ciphertext, key_id, batch_id) "
                "VALUES %s ON CONFLICT (token) DO NOTHING",
                [(*row, self.batch_id) for row in escrow_rows],
            )

    def rewrite(self, text: str | None) -> str | None:
        return self.pattern.sub(lambda m: self.mapping[m.group(0)], text) if text else text


def _rewrite_batch_rows(cur, batch_id: str, mapper: _TokenMapper) -> int:
    cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'fhir' ORDER BY 1")
    tables = [row[0] for row in cur.fetchall()]
    rewritten = 0
    for table in tables:
        cur.execute(
            f"SELECT id, patient_id, last_updated, resource::text FROM fhir.{table} WHERE batch_id = %s", (batch_id,)
        )
        rows = cur.fetchall()
        if not rows:
            continue
        mapper.prepare([text for row in rows for text in (row[0], row[1], row[3])])
        cur.execute(f"DELETE FROM fhir.{table} WHERE batch_id = %s", (batch_id,))
        execute_values(
            cur,
            f"INSERT INTO fhir.{table} (id, patient_id, last_updated, batch_id, resource) VALUES %s",
            [
                (mapper.rewrite(id_), mapper.rewrite(patient), updated, batch_id, mapper.rewrite(resource))
                for id_, patient, updated, resource in rows
            ],
        )
        rewritten += len(rows)
    cur.execute("SELECT id_space, patient_token, person_id FROM ingest.person_links WHERE batch_id = %s", (batch_id,))
    links = cur.fetchall()
    if links:
        mapper.prepare([text for _, token, person in links for text in (token, person)])
        cur.execute("DELETE FROM ingest.person_links WHERE batch_id = %s", (batch_id,))
        execute_values(
            cur,
            "INSERT INTO ingest.person_links (id_space, patient_token, person_id, batch_id) VALUES %s",
            [(space, mapper.rewrite(token), mapper.rewrite(person), batch_id) for space, token, person in links],
        )
    return rewritten


def _retire_old_tokens(conn, to_key: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM ingest.batches WHERE status = 'committed' AND key_id <> %s", (to_key,))
        if cur.fetchone()[0] == 0:
            cur.execute("DELETE FROM escrow.identifiers WHERE key_id <> %s", (to_key,))
            log.info("escrow: %d entries under retired keys removed", cur.rowcount)
    conn.commit()
