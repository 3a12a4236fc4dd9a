"""Versioned migration files, applied in order, each once, under one lock and one transaction."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from health_ingest.errors import ConfigurationError

MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
MIGRATIONS_LOCK = 0x4865616C  # an advisory lock id: one migrator at a time


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    folder = resources.files("health_ingest.warehouse") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match["version"]), match["name"], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def migrate(conn) -> list[Migration]:
    """Apply what is missing; refuse if an applied file was edited since (migrations are immutable)."""
    applied_now = []
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATIONS_LOCK,))
        cur.execute(
            """
                CREATE TABLE IF NOT EXISTS public.health_ingest_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
        )
        cur.execute("SELECT version, checksum FROM public.health_ingest_migrations")
        applied = dict(cur.fetchall())
        for migration in available_migrations():
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise ConfigurationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it was "
                        "applied; add a new migration instead"
                    )
                continue
            cur.execute(migration.sql)
            cur.execute(
                "INSERT INTO public.health_ingest_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration)
    return applied_now


def pending_migrations(conn) -> list[Migration]:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.health_ingest_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return available_migrations()
        cur.execute("SELECT version FROM public.health_ingest_migrations")
        applied = {row[0] for row in cur.fetchall()}
    return [m for m in available_migrations() if m.version not in applied]


def require_migrated(conn) -> None:
    """Loads never migrate on their own: schema changes are an operator's decision."""
    pending = pending_migrations(conn)
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise ConfigurationError(f"the warehouse is missing migrations {names}: run 'health-ingest warehouse migrate'")
