"""The one reader of Airflow connections (the warehouse, the keyring, a FHIR server's credentials), registered
into `config.connection` so that the floors read connections without importing Airflow."""

from __future__ import annotations

from health_ingest import config


def read_connection(conn_id: str) -> config.Connection | None:
    """Airflow's lookup of `conn_id` (its secrets backends, `AIRFLOW_CONN_*`, the metadata database); None when
    there is no such connection or no Airflow context to ask."""
    try:
        from airflow.sdk import Connection

        found = Connection.get(conn_id)
    except Exception:  # no Airflow context, or no such connection
        return None
    return config.Connection(
        conn_id,
        login=found.login,
        password=found.password,
        host=found.host,
        port=found.port,
        schema=found.schema,
        extra=found.extra or "",
    )


def register() -> None:
    config.register_connection_reader(read_connection)
