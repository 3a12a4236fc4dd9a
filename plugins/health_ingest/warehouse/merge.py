"""Commit step: merge staged rows into `fhir.<type>`, record files and quarantine, in the load transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING

from health_ingest.warehouse.staging import staging_table

if TYPE_CHECKING:
    from health_ingest.pipeline import FileCounts
    from health_ingest.sources.landing import LandedDelivery


DUPLICATE_MESSAGE = "the same resource id appears again in this delivery; its newest version was loaded"


def merge_resource_type(cur, batch_id: str, resource_type: str) -> dict[int, int]:
    """Upsert by pseudonymised id; a re-delivered resource replaces the stored one unless that one is newer.

    Returns the records quarantined as duplicates, per file number (usually none).
    """
    cur.execute("SELECT ingest.ensure_fhir_table(%s)", (resource_type,))
    (table,) = cur.fetchone()
    staged = staging_table(resource_type)
    duplicates: dict[int, int] = {}
    cur.execute("SAVEPOINT merge_type")
    try:
        _upsert(cur, table, staged, batch_id)
    except Exception as error:
        if getattr(error, "pgcode", None) != "21000":  # cardinality_violation: an id twice in the batch
            raise
        cur.execute("ROLLBACK TO SAVEPOINT merge_type")
        duplicates = _quarantine_duplicates(cur, staged)
        _upsert(cur, table, staged, batch_id)
    cur.execute("RELEASE SAVEPOINT merge_type")
    return duplicates


def quarantine_rejected(cur, batch_id: str, landed: LandedDelivery) -> None:
    names = {f.file_no: f.name for f in landed.files}
    for resource_type in sorted({f.resource_type for f in landed.loadable}):
        cur.execute(
            f"""
            INSERT INTO ingest.quarantine (batch_id, file_name, line_number, reason, message)
            SELECT %s, (%s::jsonb ->> file_no::text), line_no, reason, message
              FROM {staging_table(resource_type)} WHERE reason IS NOT NULL
             ORDER BY file_no, line_no
            """,
            (batch_id, _json_object(names)),
        )


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
                "skipped" if landed_file.skip_reason else "loaded",
                landed_file.skip_reason,
                counts.rows_read if counts else 0,
                counts.rows_loaded if counts else 0,
                counts.rows_quarantined if counts else 0,
            )
        )
    cur.executemany(
        """
        INSERT INTO ingest.batch_files (batch_id, file_no, file_name, resource_type, bytes, sha256, status,
                                        skip_reason, rows_read, rows_loaded, rows_quarantined)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        rows,
    )


# --- implementation details -------------------------------------------------------------------


def _upsert(cur, table: str, staged: str, batch_id: str) -> None:
    cur.execute(
        f"""
        INSERT INTO fhir.{table} AS t (id, patient_id, last_updated, batch_id, resource)
        SELECT id, patient_id, last_updated, %s, resource FROM {staged} WHERE reason IS NULL
        ON CONFLICT (id) DO UPDATE
           SET patient_id = EXCLUDED.patient_id, last_updated = EXCLUDED.last_updated,
               batch_id = EXCLUDED.batch_id, resource = EXCLUDED.resource
         WHERE t.last_updated IS NULL OR EXCLUDED.last_updated IS NULL OR EXCLUDED.last_updated >= t.last_updated
        """,
        (batch_id,),
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
