"""Commit step: merge staged rows into `fhir.<type>`, record files and quarantine, in the load transaction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from health_ingest.errors import LoadError
from health_ingest.warehouse.indexes import build_after_rows
from health_ingest.warehouse.staging import staging_table

if TYPE_CHECKING:
    from health_ingest.deliveries import FileCounts, LandedDelivery


DUPLICATE_MESSAGE = "the same resource id appears again in this delivery; its newest version was loaded"


def merge_resource_type(cur, batch_id: str, resource_type: str, id_space: str, offered: int) -> None:
    """Upsert by pseudonymised id; a re-delivered resource replaces the stored one unless that one is newer.
    The staged rows hold each id once (see `quarantine_duplicates`); `offered` of them are good. New ids are
    inserted first without conflict arbitration; only when some were stored already does the upsert run."""
    table = fhir_table(cur, resource_type)
    staged = staging_table(batch_id, resource_type)
    inserted = insert_new(cur, batch_id, table, staged, id_space)
    if inserted > offered:
        raise LoadError(f"{resource_type}: {inserted} rows merged but {offered} staged; the counts must reconcile")
    if inserted < offered:
        _upsert(cur, table, staged, batch_id, id_space)


NEW_TABLES_LOCK = 0x4E657754  # held by the one transaction at a time that creates warehouse tables


def must_create_table(cur, qualified_name: str) -> bool:
    """Whether the caller is to create this table. When it is missing, wait first for any other transaction that
    is creating warehouse tables to end (the lock is held until commit), then look again: two batches of different
    sources that bring the same new table would otherwise both create it, and the second would fail on the
    catalog's unique key as soon as the first commits. Once the tables exist, batches never wait here."""
    cur.execute("SELECT to_regclass(%s) IS NULL", (qualified_name,))
    if not cur.fetchone()[0]:
        return False
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (NEW_TABLES_LOCK,))
    cur.execute("SELECT to_regclass(%s) IS NULL", (qualified_name,))
    return cur.fetchone()[0]


def fhir_table(cur, resource_type: str) -> str:
    """The warehouse table of a resource type (made on first use), without its schema."""
    must_create_table(cur, f"fhir.{resource_type.lower()}")
    cur.execute("SELECT ingest.ensure_fhir_table(%s)", (resource_type,))
    return cur.fetchone()[0]


def create_unindexed_table(cur, resource_type: str) -> str | None:
    """The warehouse table of a resource type new to the warehouse, without its key and indexes (`index_new_table`
    adds them once the batch has written its rows); None when the table exists."""
    if not must_create_table(cur, f"fhir.{resource_type.lower()}"):
        return None
    cur.execute("SELECT ingest.create_unindexed_fhir_table(%s)", (resource_type,))
    return cur.fetchone()[0]


def index_new_table(cur, table: str) -> bool:
    """The key and indexes of a table made by `create_unindexed_table`; False when an id came twice (the caller
    then rolls back to its savepoint and merges by the upsert rules)."""
    return build_after_rows(cur, "SELECT ingest.index_fhir_table(%s)", (table,))


def insert_all(cur, batch_id: str, table: str, staged: str, id_space: str) -> int:
    """Insert every good staged row into a table without a key yet (one made in this batch); returns how many."""
    cur.execute(_insert(table, staged), (batch_id, id_space))
    return cur.rowcount


def insert_new(cur, batch_id: str, table: str, staged: str, id_space: str) -> int:
    """Insert the good staged rows whose ids are not stored yet; returns how many went in, so that the caller
    knows whether any id was there already (stored before, or twice in what it offered)."""
    cur.execute(f"{_insert(table, staged)} ON CONFLICT (id) DO NOTHING", (batch_id, id_space))
    return cur.rowcount


def quarantine_duplicates(cur, staged: str) -> dict[int, int]:
    """An id twice in one delivery: the newest version is kept (the last one on a tie), the others quarantined.
    Returns the records quarantined per file number (usually none: one hash aggregate finds out)."""
    cur.execute(f"SELECT EXISTS (SELECT 1 FROM {staged} WHERE reason IS NULL GROUP BY id HAVING count(*) > 1)")
    if not cur.fetchone()[0]:
        return {}
    return _quarantine_duplicates(cur, staged)


def quarantine_rejected(cur, batch_id: str, landed: LandedDelivery, resource_types: set[str]) -> None:
    """The rejected rows of the types that have some, where each was (a type without any is not read)."""
    names = {f.file_no: f.name for f in landed.files}
    for resource_type in sorted(resource_types):
        cur.execute(
            f"""
            INSERT INTO ingest.quarantine (batch_id, file_name, line_number, reason, message)
            SELECT %s, (%s::jsonb ->> file_no::text), line_no, reason, message
              FROM {staging_table(batch_id, resource_type)} WHERE reason IS NOT NULL
             ORDER BY file_no, line_no
            """,
            (batch_id, _json_object(names)),
        )


def link_persons(cur, batch_id: str, id_space: str, patient_staging: str) -> int:
    """Record new Patient -> person links, and move rows already stored under the Patient's token to the person.

    Resources can arrive before their Patient (files come in name order, batches in any order): the links are
    applied to what is stored as well as to what comes later (see `_upsert`).
    """
    cur.execute(
        f"""
        CREATE TEMPORARY TABLE new_links ON COMMIT DROP AS
        WITH upserted AS (
            INSERT INTO ingest.person_links (id_space, patient_token, person_id, batch_id)
            SELECT DISTINCT ON (id) %s, id, patient_id, %s
              FROM {patient_staging} WHERE reason IS NULL AND patient_id IS DISTINCT FROM id
            ON CONFLICT (id_space, patient_token) DO UPDATE SET person_id = EXCLUDED.person_id
             WHERE person_links.person_id <> EXCLUDED.person_id
            RETURNING patient_token, person_id
        )
        SELECT * FROM upserted
        """,
        (id_space, batch_id),
    )
    cur.execute("SELECT count(*) FROM new_links")
    (linked,) = cur.fetchone()
    if linked:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'fhir'")
        for (table,) in cur.fetchall():
            cur.execute(
                f"UPDATE fhir.{table} t SET patient_id = l.person_id FROM new_links l "
                "WHERE t.patient_id = l.patient_token"
            )
    cur.execute("DROP TABLE new_links")
    return linked


def store_escrow(cur, batch_id: str, spool: Path) -> int:
    """Originals (encrypted) of the tokens this batch created; one row per token, first batch kept."""
    cur.execute(
        "CREATE TEMPORARY TABLE staging_escrow (token text, domain text, ciphertext bytea, key_id text) ON COMMIT DROP"
    )
    with spool.open("rb") as handle:
        cur.copy_expert("COPY staging_escrow FROM STDIN", handle, size=1 << 18)
    cur.execute(
        """
        INSERT INTO escrow.identifiers (token, domain, ciphertext, key_id, batch_id)
        SELECT DISTINCT ON (token) token, domain, ciphertext, key_id, %s FROM staging_escrow
        ON CONFLICT (token) DO NOTHING
        """,
        (batch_id,),
    )
    return cur.rowcount


def record_files(cur, batch_id: str, landed: LandedDelivery, file_counts: dict[int, FileCounts]) -> None:
    rows = []
    for landed_file in landed.files:
        counts = file_counts.get(landed_file.file_no)
        rows.append(
            (
                batch_id,
                landed_file.file_no,
                landed_file.name,
                landed_file.resource_type,
                landed_file.bytes,
                landed_file.sha256,
                landed_file.status,
                landed_file.skip_reason,
                counts.rows_read if counts else 0,
                counts.rows_loaded if counts else 0,
                counts.rows_quarantined if counts else 0,
                landed_file.derived_from,
            )
        )
    cur.executemany(
        """
        INSERT INTO ingest.batch_files (batch_id, file_no, file_name, resource_type, bytes, sha256, status,
                                        skip_reason, rows_read, rows_loaded, rows_quarantined, derived_from)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        rows,
    )


# --- implementation details -------------------------------------------------------------------


def _insert(table: str, staged: str) -> str:
    return f"""
        INSERT INTO fhir.{table} AS t (id, patient_id, last_updated, batch_id, resource)
        SELECT s.id, coalesce(link.person_id, s.patient_id), s.last_updated, %s, s.resource
          FROM {staged} s
          LEFT JOIN ingest.person_links link ON link.id_space = %s AND link.patient_token = s.patient_id
         WHERE s.reason IS NULL
        """


def _upsert(cur, table: str, staged: str, batch_id: str, id_space: str) -> None:
    """The rows this batch has just inserted are left as they are; stored ones are replaced unless newer."""
    cur.execute(
        f"""
        {_insert(table, staged)}
        ON CONFLICT (id) DO UPDATE
           SET patient_id = EXCLUDED.patient_id, last_updated = EXCLUDED.last_updated,
               batch_id = EXCLUDED.batch_id, resource = EXCLUDED.resource
         WHERE t.batch_id <> EXCLUDED.batch_id
           AND (t.last_updated IS NULL OR EXCLUDED.last_updated IS NULL OR EXCLUDED.last_updated >= t.last_updated)
        """,
        (batch_id, id_space),
    )


def _quarantine_duplicates(cur, staged: str) -> dict[int, int]:
    """Keep the newest version of an id (the last one in the delivery on a tie); the others are quarantined."""
    cur.execute(
        f"""
        UPDATE {staged} s SET reason = 'duplicate_in_batch', message = %s
          FROM (SELECT file_no, line_no,
                       row_number() OVER (PARTITION BY id
                                          ORDER BY last_updated DESC NULLS LAST, file_no DESC, line_no DESC) AS rank
                  FROM {staged} WHERE reason IS NULL) ranked
         WHERE ranked.rank > 1 AND s.file_no = ranked.file_no AND s.line_no = ranked.line_no
        RETURNING s.file_no
        """,
        (DUPLICATE_MESSAGE,),
    )
    per_file: dict[int, int] = {}
    for (file_no,) in cur.fetchall():
        per_file[file_no] = per_file.get(file_no, 0) + 1
    return per_file


def _json_object(mapping: dict[int, str]) -> str:
    import json

    return json.dumps({str(k): v for k, v in mapping.items()})
