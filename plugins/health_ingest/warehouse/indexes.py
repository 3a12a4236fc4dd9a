"""Keys and indexes built after a new table's first rows, on both batch paths: each is then one sort, where keeping
it up row by row costs more than writing the rows."""

from __future__ import annotations

UNIQUE_VIOLATION = "23505"
INDEX_SORT_MEMORY = "8MB"  # for each index built after a new table's rows


def build_after_rows(cur, statement: str, params: tuple | None = None) -> bool:
    """Run a statement that builds keys or indexes; False when a key came twice (see `unless_key_twice`)."""
    # a sort of a few MiB that spills to disk builds about as fast as one held in memory, and the backend's memory
    # then does not grow with the table (this setting ends with the transaction)
    cur.execute(f"SET LOCAL maintenance_work_mem = '{INDEX_SORT_MEMORY}'")
    return unless_key_twice(cur, statement, params)


def unless_key_twice(cur, statement: str, params: tuple | dict | None = None) -> bool:
    """Run a statement; False when it failed on a unique key met twice. The transaction is then aborted: the caller
    rolls back to its savepoint and takes the way that arbitrates between the rows."""
    try:
        cur.execute(statement, params)
    except Exception as error:
        if getattr(error, "pgcode", None) != UNIQUE_VIOLATION:
            raise
        return False
    return True
