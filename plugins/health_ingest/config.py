"""Where the project keeps its state, every `HEALTH_INGEST_*` environment variable, and how a connection is read.

Connections (the warehouse, the keyring, a FHIR server's credentials) are Airflow connections. Under Airflow they are
read by the reader that `health_ingest.airflow.connections` registers here; elsewhere from `AIRFLOW_CONN_<ID>`, in
Airflow's JSON or URI form. The floors ask `connection(conn_id)` and never import Airflow.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from health_ingest.errors import ConfigurationError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

ENV_HOME = "HEALTH_INGEST_HOME"
ENV_STATE = "HEALTH_INGEST_STATE"
ENV_SOURCES = "HEALTH_INGEST_SOURCES"
ENV_WAREHOUSE_URL = "HEALTH_INGEST_WAREHOUSE_URL"
ENV_WAREHOUSE_HOSTING = "HEALTH_INGEST_WAREHOUSE_HOSTING"
ENV_HOSTING_POLICY = "HEALTH_INGEST_HOSTING_POLICY"
ENV_KEYRING = "HEALTH_INGEST_KEYRING"
ENV_DEMO = "HEALTH_INGEST_DEMO"
ENV_RETENTION_DAYS = "HEALTH_INGEST_RETENTION_DAYS"
ENV_WORKERS = "HEALTH_INGEST_WORKERS"
# Workers run at the lowest priority: on a shared machine, the database (staging, merging, checking the previous
# parts) comes first and the workers take what it leaves, so that the batch does not end on a backlog of merges.
ENV_WORKER_NICENESS = "HEALTH_INGEST_WORKER_NICENESS"
ENV_COMPAT_KEY = "HEALTH_INGEST_COMPAT_KEY"
ENV_BENCH_DATABASE_URL = "HEALTH_INGEST_BENCH_DATABASE_URL"
# The map index of the Airflow task loading a batch, which Airflow does not export to the task's environment as it
# does its dag, run and task ids (AIRFLOW_CTX_*): set by the task adapter, recorded on the batch for the UI's links.
ENV_AIRFLOW_MAP_INDEX = "HEALTH_INGEST_AIRFLOW_MAP_INDEX"
ENV_DELIVERY_CHANNEL = "HEALTH_INGEST_DELIVERY_CHANNEL"

WAREHOUSE_CONN_ID = "health_ingest_warehouse"
KEYRING_CONN_ID = "health_ingest_keyring"
QUEUE_CONN_ID = "health_ingest_queue"  # the Redis on which senders announce deliveries
DEFAULT_RETENTION_DAYS = 30
DEFAULT_NICENESS = 19

# What one file of a delivery may make the pipeline read: beyond these, a line is quarantined (FHIR) or the
# delivery refused (a claims line, a compressed file), so that memory never grows with what a file holds.
ENV_MAX_LINE_BYTES = "HEALTH_INGEST_MAX_LINE_BYTES"
ENV_MAX_DECOMPRESSED_BYTES = "HEALTH_INGEST_MAX_DECOMPRESSED_BYTES"
ENV_MAX_COMPRESSION_RATIO = "HEALTH_INGEST_MAX_COMPRESSION_RATIO"
ENV_MAX_BUNDLE_BYTES = "HEALTH_INGEST_MAX_BUNDLE_BYTES"


@dataclass(frozen=True)
class ReadLimits:
    line_bytes: int = 64 << 20  # one NDJSON resource or one CSV row
    decompressed_bytes: int = 64 << 30  # one compressed file, once decompressed
    compression_ratio: int = 200  # decompressed bytes per compressed byte read (real exports: 5 to 30)
    bundle_bytes: int = 256 << 20  # a Bundle is parsed whole


def read_limits() -> ReadLimits:
    """The limits, from the environment; a value out of range is refused by name."""
    defaults = ReadLimits()
    return ReadLimits(
        line_bytes=setting(ENV_MAX_LINE_BYTES, defaults.line_bytes, 1, 1 << 40),
        decompressed_bytes=setting(ENV_MAX_DECOMPRESSED_BYTES, defaults.decompressed_bytes, 1, 1 << 50),
        compression_ratio=setting(ENV_MAX_COMPRESSION_RATIO, defaults.compression_ratio, 1, 1 << 20),
        bundle_bytes=setting(ENV_MAX_BUNDLE_BYTES, defaults.bundle_bytes, 1, 1 << 40),
    )


def project_root() -> Path:
    """The checkout that holds `dags/`, `samples/` and `expectations/`."""
    return Path(os.environ.get(ENV_HOME, PROJECT_ROOT)).resolve()


def state_dir() -> Path:
    """Runtime state (embedded warehouse, landing zone, Airflow metadata), never committed."""
    path = Path(os.environ.get(ENV_STATE, project_root() / ".state")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sources_file() -> Path:
    return Path(os.environ.get(ENV_SOURCES, project_root() / "dags" / "sources.yml")).resolve()


def hosting_policy_file() -> Path:
    return Path(os.environ.get(ENV_HOSTING_POLICY) or project_root() / "dags" / "hosting-policy.yml")


def declared_hosting() -> str | None:
    """The warehouse's hosting declaration (JSON), when it is given by the environment."""
    return os.environ.get(ENV_WAREHOUSE_HOSTING) or None


def delivery_channel() -> str:
    """The Redis channel on which senders publish delivery messages (`HEALTH_INGEST_DELIVERY_CHANNEL`)."""
    return os.environ.get(ENV_DELIVERY_CHANNEL) or "health_ingest.deliveries"


def demo_mode() -> bool:
    """Demo mode allows a generated keyring; production refuses to run without a real one."""
    return os.environ.get(ENV_DEMO, "").lower() in {"1", "true", "yes"}


def retention_days() -> int:
    return int(os.environ.get(ENV_RETENTION_DAYS, DEFAULT_RETENTION_DAYS))


def workers() -> int:
    """Worker processes per batch: one per core unless said otherwise."""
    return setting(ENV_WORKERS, os.cpu_count() or 1, 1, 256)


def worker_niceness() -> int:
    return setting(ENV_WORKER_NICENESS, DEFAULT_NICENESS, 0, 19)


def setting(name: str, default: int, low: int, high: int) -> int:
    """An integer setting from the environment, refused with a message that names it when out of range."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be a whole number from {low} to {high}, not {raw!r}")
    return value


def running_under_airflow() -> bool:
    """True inside an Airflow process (a task, the triggerer): only then are Airflow connections consulted.

    Importing Airflow from a plain command would reconfigure its logging (onto stdout, which a filter owns).
    """
    return "airflow.sdk" in sys.modules


@dataclass(frozen=True)
class Connection:
    """The fields of an Airflow connection that the project reads."""

    conn_id: str
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    schema: str | None = None
    extra: str = ""  # JSON text, as Airflow stores it

    def extra_dict(self) -> dict:
        """The extra as a mapping; one that is not a JSON object is a configuration error."""
        try:
            extra = json.loads(self.extra) if self.extra.strip() else {}
        except ValueError:
            raise ConfigurationError(f"connection {self.conn_id}: 'extra' is not JSON") from None
        if not isinstance(extra, dict):
            raise ConfigurationError(f"connection {self.conn_id}: 'extra' must be a JSON object")
        return extra


ConnectionReader = Callable[[str], "Connection | None"]
_airflow_reader: ConnectionReader | None = None


def register_connection_reader(reader: ConnectionReader) -> None:
    """Airflow's own lookup (secrets backends, the metadata database), used inside Airflow processes."""
    global _airflow_reader
    _airflow_reader = reader


def connection(conn_id: str) -> Connection | None:
    """The connection `conn_id`, or None when it is not defined."""
    if _airflow_reader is not None and running_under_airflow():
        found = _airflow_reader(conn_id)
        if found is not None:
            return found
    return _environment_connection(conn_id)


# --- implementation details -------------------------------------------------------------------


def _environment_connection(conn_id: str) -> Connection | None:
    """`AIRFLOW_CONN_<ID>` in Airflow's JSON form, or its URI form (`postgresql://user:password@host/db?extra`)."""
    raw = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if not raw:
        return None
    if raw.lstrip().startswith("{"):
        try:
            document = json.loads(raw)
        except ValueError:
            raise ConfigurationError(f"connection {conn_id}: AIRFLOW_CONN_* must use Airflow's JSON form") from None
        extra = document.get("extra") or ""
        return Connection(
            conn_id,
            login=document.get("login"),
            password=document.get("password"),
            host=document.get("host"),
            port=document.get("port"),
            schema=document.get("schema"),
            extra=extra if isinstance(extra, str) else json.dumps(extra),
        )
    if "://" not in raw:
        raise ConfigurationError(f"connection {conn_id}: AIRFLOW_CONN_* must use Airflow's JSON form")
    parts = urlsplit(raw)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    extra = query.pop("__extra__", None) or (json.dumps(query) if query else "")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    login, colon, password = userinfo.partition(":")
    host, port = _host_and_port(conn_id, hostport)
    return Connection(
        conn_id,
        login=unquote(login) or None,
        password=unquote(password) if colon else None,
        host=host,
        port=port,
        schema=unquote(parts.path.lstrip("/")) or None,
        extra=extra,
    )


def _host_and_port(conn_id: str, hostport: str) -> tuple[str | None, int | None]:
    """The host and port of a URI's authority, as Airflow reads them (`[::1]:5432` is `::1` and 5432; a socket
    folder given as `%2Fvar%2Frun%2Fpostgresql` is that folder). Several hosts (libpq's `h1:5432,h2:5433`), which
    no single host and port can hold, are kept as written, as the host."""
    if not hostport:
        return None, None
    if "," in hostport:
        return unquote(hostport), None
    host, port = hostport, None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    if port is not None and not port.isdigit():
        raise ConfigurationError(f"connection {conn_id}: the port is not a number")
    return unquote(host) or None, int(port) if port else None
