"""Stage a batch with `COPY`: one temporary table per resource type, good and rejected rows side by side."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

COPY_CHUNK = 1 << 18
STAGING_COLUMNS = "file_no, line_no, id, patient_id, last_updated, reason, message, resource"


STAGING_SCHEMA = "ingest_staging"
# staging tables live for one batch: autovacuum would only spend a core scanning them while the batch runs
TRANSIENT = "WITH (autovacuum_enabled = false)"


def staging_table(batch_id: str, resource_type: str) -> str:
    """`ingest_staging.b<batch>_<type>`: one unlogged table per batch and resource type."""
    return f"{STAGING_SCHEMA}.b{batch_id.replace('-', '')[:16]}_{resource_type.lower()}"


def create_staging_table(cur, batch_id: str, resource_type: str) -> str:
    """Unlogged (staging is rebuilt from the landing copy after a crash, never recovered) and committed at once,
    so that the quality suites, on their own connection, see what the load transaction merges."""
    table = staging_table(batch_id, resource_type)
    cur.execute(
        f"""
        CREATE UNLOGGED TABLE IF NOT EXISTS {table} (
            file_no       integer NOT NULL,
            line_no       bigint NOT NULL,
            id            text,
            patient_id    text,
            last_updated  timestamptz,
            reason        text,
            message       text,
            resource      jsonb
        ) {TRANSIENT}
        """
    )
    return table


def create_staging_part(cur, batch_id: str, resource_type: str, part_no: int) -> str:
    """A part of a type's staging table, for one spool: reading the type's table reads all its parts, and the
    load transaction can merge one part while the next is copied."""
    parent = staging_table(batch_id, resource_type)
    part = f"{parent}_p{part_no}"
    cur.execute(f"CREATE UNLOGGED TABLE {part} () INHERITS ({parent}) {TRANSIENT}")
    return part


def drop_staging_tables(cur, batch_id: str) -> None:
    prefix = staging_table(batch_id, "x")[len(STAGING_SCHEMA) + 1 : -1]
    cur.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND starts_with(tablename, %s)",
        (STAGING_SCHEMA, prefix),
    )
    tables = [f"{STAGING_SCHEMA}.{table}" for (table,) in cur.fetchall()]
    if tables:  # in one statement: one commit, however many parts the batch staged
        cur.execute(f"DROP TABLE IF EXISTS {', '.join(tables)} CASCADE")


def drop_leftover_staging(cur) -> int:
    """Drop the staging of every batch that is no longer loading (one whose process could not drop it: a lost
    connection, a crash); returns how many tables it dropped."""
    cur.execute(
        """
        SELECT t.tablename
          FROM pg_tables t
         WHERE t.schemaname = %s
           AND NOT EXISTS (SELECT FROM ingest.batches b
                            WHERE b.status = 'loading'
                              AND starts_with(t.tablename, 'b' || left(replace(b.batch_id::text, '-', ''), 16) || '_'))
        """,
        (STAGING_SCHEMA,),
    )
    tables = [f"{STAGING_SCHEMA}.{table}" for (table,) in cur.fetchall()]
    if tables:
        cur.execute(f"DROP TABLE IF EXISTS {', '.join(tables)} CASCADE")
    return len(tables)


def copy_files(cur, table: str, files: list[Path], columns: str | None = STAGING_COLUMNS, *, options: str = "") -> None:
    """COPY files of already-encoded rows (text format unless `options` say otherwise), one after the other, as one
    statement (`columns` None: all)."""
    target = f"{table} ({columns})" if columns else table
    with _Concatenated(files) as handle:
        cur.copy_expert(f"COPY {target} FROM STDIN{f' WITH ({options})' if options else ''}", handle, size=COPY_CHUNK)


def escape_text(value: str) -> str:
    """A value as a field of COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


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
    return escape_text(value).encode()


class _Concatenated:
    """Files read one after the other, as one stream (what `copy_expert` reads from)."""

    def __init__(self, files: list[Path]) -> None:
        self._files = iter(files)
        self._current: BinaryIO | None = None

    def __enter__(self) -> _Concatenated:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._current is not None:
            self._current.close()

    def read(self, size: int = -1) -> bytes:
        while True:
            if self._current is None:
                path = next(self._files, None)
                if path is None:
                    return b""
                self._current = path.open("rb")
            data = self._current.read(size)
            if data:
                return data
            self._current.close()
            self._current = None
