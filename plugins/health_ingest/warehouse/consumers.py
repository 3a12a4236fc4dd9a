"""The consumer contract: committed batches after a watermark, Airflow Asset URIs per warehouse table.

Downstream users read `ingest.batches` rows with `status = 'committed'` and `commit_seq` above the last one they
processed (commits are serialised, so commit_seq order is commit order), then the rows of those batches
(`batch_id` is on every warehouse row). A `NOTIFY health_ingest_batches` fires at each commit, and every DAG
emits an Airflow Asset event per table it wrote, which consumer DAGs schedule on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
EMBEDDED_ASSET_BASE = "postgres://localhost:5432/warehouse"


@dataclass(frozen=True)
class CommittedBatch:
    batch_id: str
    source: str
    commit_seq: int


def table_asset_uri(schema: str, table: str, url: str | None = None) -> str:
    """`postgres://host:port/db/schema/table` for the configured warehouse, `HEALTH_INGEST_WAREHOUSE_URL` or the
    connection `health_ingest_warehouse` (no connection is opened): the URI names where the data really is."""
    from health_ingest.warehouse.connection import configured_warehouse_url

    if not (IDENTIFIER.match(schema) and IDENTIFIER.match(table)):
        raise ValueError(f"not a warehouse table: {schema}.{table}")
    url = url or configured_warehouse_url()
    if not url:
        return f"{EMBEDDED_ASSET_BASE}/{schema}/{table}"
    from psycopg2.extensions import parse_dsn

    options = parse_dsn(url)  # as libpq reads it: `?host=` and `?port=` override the authority
    host = (options.get("host") or "").split(",")[0].lower()  # of several hosts, the first names the warehouse
    if not host or host.startswith(("/", "@")):
        host = "localhost"  # a Unix socket is this machine
    elif ":" in host:
        host = f"[{host}]"
    port = int((options.get("port") or "5432").split(",")[0] or 5432)
    database = options.get("dbname") or options.get("user") or "postgres"
    return f"postgres://{host}:{port}/{database}/{schema}/{table}"


def committed_batches_after(conn, watermark: int, source: str | None = None) -> list[CommittedBatch]:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT batch_id::text, source, commit_seq FROM ingest.batches
             WHERE status = 'committed' AND commit_seq > %(watermark)s
               AND (%(source)s::text IS NULL OR source = %(source)s)
             ORDER BY commit_seq
            """,
            {"watermark": watermark, "source": source},
        )
        return [CommittedBatch(*row) for row in cur.fetchall()]


def rows_of_batch(conn, schema: str, table: str, batch_id: str) -> int:
    if not (IDENTIFIER.match(schema) and IDENTIFIER.match(table)):
        raise ValueError(f"not a warehouse table: {schema}.{table}")
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{schema}.{table}",))
        if cur.fetchone()[0] is None:
            return 0
        cur.execute(f"SELECT count(*) FROM {schema}.{table} WHERE batch_id = %s", (batch_id,))
        return cur.fetchone()[0]
