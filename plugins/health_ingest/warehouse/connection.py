"""Which warehouse to use and how to connect to it."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit, urlunsplit

from health_ingest import config
from health_ingest.config import running_under_airflow

log = logging.getLogger(__name__)


def warehouse_url() -> str:
    """`HEALTH_INGEST_WAREHOUSE_URL`, else the Airflow connection, else the embedded warehouse."""
    url = os.environ.get(config.ENV_WAREHOUSE_URL)
    if url:
        return url
    url = _airflow_connection_url()
    if url:
        return url
    from health_ingest.warehouse.embedded import start_embedded_warehouse

    return start_embedded_warehouse()


def connect(url: str):
    import psycopg2

    return psycopg2.connect(url, application_name="health-ingest")


def redact(url: str) -> str:
    """The URL without its password, fit for logs and summaries."""
    parts = urlsplit(url)
    if not parts.password:
        return url.replace(":@", "@", 1) if parts.password == "" else url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _airflow_connection_url() -> str | None:
    if not running_under_airflow():
        return None
    try:
        from airflow.sdk import Connection

        connection = Connection.get(config.WAREHOUSE_CONN_ID)
    except Exception:  # no Airflow context, or no such connection
        return None
    uri = connection.get_uri()
    return uri.replace("postgres://", "postgresql://", 1)
