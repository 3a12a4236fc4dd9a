"""Which warehouse to use and how to connect to it."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import re
import weakref
from urllib.parse import urlsplit, urlunsplit

from health_ingest import config
from health_ingest.errors import ConfigurationError

log = logging.getLogger(__name__)

# hosting declarations found in Airflow connection extras, by the URL they describe
_DECLARED_BY_AIRFLOW: dict[str, dict] = {}
# the warehouse connections this process opened, for the processes forked from it (`release_inherited_connections`)
_OPENED = weakref.WeakSet()


def warehouse_url() -> str:
    """`HEALTH_INGEST_WAREHOUSE_URL`, else the Airflow connection `health_ingest_warehouse`, else the embedded
    warehouse, which is then announced: a command must never quietly load or report the wrong database."""
    url = configured_warehouse_url()
    if url:
        return url
    from health_ingest.warehouse.embedded import start_embedded_warehouse

    log.warning(
        "no warehouse configured (neither %s nor the connection %s, e.g. AIRFLOW_CONN_%s): using the embedded "
        "PostgreSQL under the state folder",
        config.ENV_WAREHOUSE_URL,
        config.WAREHOUSE_CONN_ID,
        config.WAREHOUSE_CONN_ID.upper(),
    )
    return start_embedded_warehouse()


def configured_warehouse_url() -> str | None:
    """The warehouse the configuration names (`HEALTH_INGEST_WAREHOUSE_URL`, else the connection
    `health_ingest_warehouse`: Airflow's, or `AIRFLOW_CONN_HEALTH_INGEST_WAREHOUSE` outside Airflow), else None;
    nothing is started."""
    return os.environ.get(config.ENV_WAREHOUSE_URL) or _airflow_connection_url()


def warehouse_origin() -> str:
    """Where the warehouse comes from, in words for people."""
    if os.environ.get(config.ENV_WAREHOUSE_URL):
        return config.ENV_WAREHOUSE_URL
    if _airflow_connection_url():
        return f"the connection {config.WAREHOUSE_CONN_ID}"
    return "the embedded PostgreSQL"


# A batch's connections must not outlive its process: when it dies, or its host or the network does, the server
# ends the session, and with it the batch's transaction and its source's lock. TCP keepalives on both sides find a
# silent peer within about 25 s; the server checks the client is still there during a long statement; and a
# transaction left idle by a hung client is ended.
SESSION_SETTINGS = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "client_connection_check_interval": "2000",
    "idle_in_transaction_session_timeout": "900000",
}
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def connect(url: str):
    """Every connection to the warehouse goes through the jurisdiction guard first: a refusal sends nothing. A
    warehouse that cannot be reached is a `LoadError` that says so."""
    import psycopg2
    from psycopg2.extensions import parse_dsn

    from health_ingest.errors import LoadError

    hosting_decision(url)
    given = parse_dsn(url).get("options", "")
    options = " ".join([given, *(f"-c {name}={value}" for name, value in SESSION_SETTINGS.items())]).strip()
    try:
        conn = psycopg2.connect(url, application_name="health-ingest", options=options, **KEEPALIVES)
    except psycopg2.OperationalError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no answer"
        raise LoadError(f"the warehouse cannot be reached ({reason}); nothing was loaded") from None
    _OPENED.add(conn)
    return conn


def release_inherited_connections() -> None:
    """In a process forked from one holding warehouse sessions (a batch's worker), its copies of their sockets are
    pointed at /dev/null. The process that opened a session is then the only one holding it: when that process
    dies, the server sees the session end at once and releases its transaction and locks, whatever becomes of its
    workers; and nothing done in the fork (a connection object collected there) can speak on the session."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for conn in list(_OPENED):
            if not conn.closed:
                with contextlib.suppress(Exception):  # a connection whose socket is already gone
                    os.dup2(devnull, conn.fileno(), inheritable=False)
    finally:
        os.close(devnull)


def redact(url: str) -> str:
    """The URL without its password (in the authority or as a query parameter), fit for logs and summaries."""
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url)
    parts = urlsplit(url)
    if not parts.password:
        return url.replace(":@", "@", 1) if parts.password == "" else url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _airflow_connection_url() -> str | None:
    connection = config.connection(config.WAREHOUSE_CONN_ID)
    if connection is None:
        return None
    extras = connection.extra_dict()
    hosting = extras.pop("hosting", None)
    uri = _postgres_url(connection, extras)
    if hosting is not None:
        _DECLARED_BY_AIRFLOW[uri] = hosting
    return uri


def _postgres_url(connection, extras: dict) -> str:
    """A libpq URI from the connection's fields and extras, naming what libpq would connect to given the URI the
    connection was made from: every libpq keyword of the extras (`host`, `hostaddr`, `port`, `sslmode`, `options`,
    ...) goes into the query string, where libpq lets it override the authority; other extras are not libpq's and
    stay out. A socket folder (or an abstract socket) given as the host goes into the query too, and a port given
    with several hosts applies to each of them there. No host means libpq's default (`PGHOST`, else the local
    socket), no database libpq's default as well, as for the URI."""
    from urllib.parse import quote

    query = {key: _libpq_value(connection, key, value) for key, value in extras.items() if _libpq_keyword(key)}
    userinfo = quote(connection.login or "", safe="")
    if connection.password is not None:
        userinfo += ":" + quote(connection.password, safe="")
    host = connection.host or ""
    if host.startswith(("/", "@")):
        query.setdefault("host", host)
        host = ""
    elif _ipv6(host):
        host = f"[{host}]"
    else:
        host = quote(host, safe=",:[]")
    authority = (userinfo + "@" if userinfo else "") + host
    if connection.port and "," in host:
        query.setdefault("port", str(connection.port))
    elif connection.port:
        authority += f":{connection.port}"
    path = "/" + quote(connection.schema, safe="") if connection.schema else "/"
    text = "&".join(f"{key}={quote(value, safe='/,:')}" for key, value in query.items())
    return f"postgresql://{authority}{path}" + (f"?{text}" if text else "")


def hosting_decision(url: str):
    """What the guard decided for this warehouse, to record on each batch."""
    from health_ingest.warehouse.jurisdiction import check_warehouse, declared_hosting_from_env

    return check_warehouse(url, _DECLARED_BY_AIRFLOW.get(url) or declared_hosting_from_env())


# --- implementation details -------------------------------------------------------------------


@functools.cache
def _libpq_keyword(key: str) -> bool:
    """Whether libpq itself (the one psycopg2 connects with) knows `key` as a connection keyword."""
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    if not re.fullmatch(r"[a-z_]+", key):
        return False
    try:
        parse_dsn(f"{key}=''")
    except ProgrammingError:
        return False
    return True


def _libpq_value(connection, key: str, value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str | int | float):
        return str(value)
    raise ConfigurationError(f"connection {connection.conn_id}: extra {key!r} must be a string or a number")


def _ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
