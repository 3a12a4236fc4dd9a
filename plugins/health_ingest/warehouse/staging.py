"""Stage a batch with `COPY`: one temporary table per resource type, good and rejected rows side by side."""

from __future__ import annotations

from pathlib import Path

COPY_CHUNK = 1 << 18
STAGING_COLUMNS = "file_no, line_no, id, patient_id, last_updated, reason, message, resource"


def staging_table(resource_type: str) -> str:
    return f"staging_{resource_type.lower()}"


def create_staging_table(cur, resource_type: str) -> str:
    """Temporary (so unlogged and private to the load) and dropped at commit or rollback."""
    table = staging_table(resource_type)
    cur.execute(
        f"""
        CREATE TEMPORARY TABLE IF NOT EXISTS {table} (
            file_no       integer NOT NULL,
            line_no       bigint NOT NULL,
            id            text,
            patient_id    text,
            last_updated  timestamptz,
            reason        text,
            message       text,
            resource      jsonb
        ) ON COMMIT DROP
        """
    )
    return table


def copy_spool(cur, table: str, spool: Path) -> None:
    """COPY a file of already-encoded rows (text format) into a staging table."""
    with spool.open("rb") as handle:
        cur.copy_expert(f"COPY {table} ({STAGING_COLUMNS}) FROM STDIN", handle, size=COPY_CHUNK)


def encode_loaded(
    file_no: int, line_no: int, resource_id: str, patient_id: str | None, last_updated: str | None, doc: bytes
) -> bytes:
    """A staged resource; `doc` is compact JSON, whose only COPY-special character can be the backslash."""
    return b"%d\t%d\t%s\t%s\t%s\t\\N\t\\N\t%s\n" % (
        file_no,
        line_no,
        resource_id.encode(),
        patient_id.encode() if patient_id else b"\\N",
        last_updated.encode() if last_updated else b"\\N",
        doc.replace(b"\\", b"\\\\"),
    )


def encode_rejected(file_no: int, line_no: int, reason: str, message: str) -> bytes:
    return b"%d\t%d\t\\N\t\\N\t\\N\t%s\t%s\t\\N\n" % (file_no, line_no, _text(reason), _text(message))


# --- implementation details -------------------------------------------------------------------


def _text(value: str) -> bytes:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r").encode()
