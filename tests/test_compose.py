"""docker-compose.yml describes the stack the tests run: valid Compose, its Airflow settings shared with the stack
test, and a warehouse that the project's own hosting policy allows, reached with verified TLS."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from airflow_stack import deployment_settings

PROJECT = Path(__file__).resolve().parents[1]
COMPOSE = PROJECT / "docker-compose.yml"
SCHEMA = PROJECT / "deploy" / "compose-spec.json"
AIRFLOW_SERVICES = {
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _airflow_environment() -> dict[str, str]:
    """What an Airflow container sees: the shared settings file, then the compose file's own variables."""
    anchor = _compose()["x-airflow"]
    assert anchor["env_file"] == ["deploy/airflow.env"]
    return {**deployment_settings(), **anchor["environment"]}


def test_compose_file_is_valid_against_the_compose_specification_schema():
    from jsonschema import Draft201909Validator

    schema = json.loads(SCHEMA.read_text())
    Draft201909Validator.check_schema(schema)
    validator = Draft201909Validator(schema)
    compose = _compose()
    assert [error.message for error in validator.iter_errors(compose)] == []

    misspelt = _compose()
    misspelt["services"]["warehouse"]["healthchek"] = misspelt["services"]["warehouse"].pop("healthcheck")
    assert any("healthchek" in error.message for error in validator.iter_errors(misspelt)), "the schema is strict"


def test_the_stack_has_every_airflow_component_two_celery_workers_its_metadata_database_broker_and_warehouse():
    services = _compose()["services"]
    assert AIRFLOW_SERVICES | {"airflow-init", "airflow-db", "redis", "warehouse", "warehouse-tls"} <= set(services)
    assert services["warehouse"]["image"] == "postgres:15", "the version CI's integration pass runs against"
    commands = {name: services[name]["command"] for name in AIRFLOW_SERVICES}
    assert commands["airflow-worker"] == ["airflow", "celery", "worker"]
    assert services["airflow-worker"]["deploy"]["replicas"] == 2
    assert "health-ingest warehouse migrate" in " ".join(services["airflow-init"]["command"])
    # certificates first, then the warehouse, then the migrations, then Airflow
    assert services["warehouse"]["depends_on"]["warehouse-tls"]["condition"] == "service_completed_successfully"
    assert services["airflow-init"]["depends_on"]["warehouse"]["condition"] == "service_healthy"
    for name in AIRFLOW_SERVICES:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_every_airflow_setting_of_the_stack_exists_and_its_executor_imports():
    from importlib import import_module

    from airflow.configuration import conf
    from airflow.providers_manager import ProvidersManager

    provider_options = {
        (section, option)
        for _, config in ProvidersManager().provider_configs
        for section, content in config.items()
        for option in content.get("options", {})
    }
    environment = _airflow_environment()
    for key in (k for k in environment if k.startswith("AIRFLOW__")):
        section, option = key.removeprefix("AIRFLOW__").lower().removesuffix("_cmd").split("__", 1)
        described = option in conf.configuration_description.get(section, {}).get("options", {})
        assert described or (section, option) in provider_options, key
    assert environment["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert import_module("airflow.providers.celery.executors.celery_executor").CeleryExecutor
    assert environment["HEALTH_INGEST_KEYRING"].startswith("/run/secrets/"), "keys come from a secret, not the image"


def test_compose_warehouse_connection_passes_the_projects_hosting_policy():
    from health_ingest.warehouse.jurisdiction import check_warehouse, load_policy

    url, hosting = _compose_warehouse()
    policy = load_policy(PROJECT / "dags" / "hosting-policy.yml")
    decision = check_warehouse(url, hosting, policy)
    assert decision.declared and decision.hosting.jurisdiction in policy.allowed_jurisdictions
    assert "sslmode=verify-full" in url

    # the same connection without its declaration, or without certificate checks, is refused by name
    with pytest.raises(Exception, match="declaration-required"):
        check_warehouse(url, None, policy)
    with pytest.raises(Exception, match="require_verified_tls_for_remote_hosts"):
        check_warehouse(url.replace("verify-full", "require"), hosting, policy)


@pytest.mark.integration
def test_compose_warehouse_serves_tls_that_verify_full_accepts_with_the_init_services_certificates():
    """The init service's script makes the certificates into the compose volumes, the warehouse starts with the
    compose file's TLS options, and a client with the compose connection's CA verifies it by its service name."""
    import psycopg2

    services = _compose()["services"]
    root = Path(tempfile.mkdtemp(prefix="compose-tls-"))  # under /tmp, so the server's own user can enter it
    volumes = {name: root / name for name in _compose()["volumes"]}
    server_user = "postgres" if os.geteuid() == 0 else None  # the Debian packages' server user

    def host_path(service: dict, path: str) -> Path:
        for mount in service["volumes"]:
            source, target = mount.split(":")[:2]
            if source in volumes and (path == target or path.startswith(target + "/")):
                return volumes[source] / path[len(target) :].lstrip("/")
        raise AssertionError(f"{path} is on no named volume of the service")

    try:
        tls = services["warehouse-tls"]
        script, *arguments = tls["command"][1:]
        arguments = [str(host_path(tls, a)) if a.startswith("/") else a for a in arguments]
        if server_user:
            import pwd

            arguments[-1] = str(pwd.getpwnam(server_user).pw_uid)  # the image's postgres uid, here the server's
        else:
            arguments = arguments[:-1]
        subprocess.run(["sh", str(PROJECT / script), *arguments], check=True)

        warehouse = services["warehouse"]
        options = [o for flag, o in zip(warehouse["command"][1::2], warehouse["command"][2::2], strict=True)]
        assert all(flag == "-c" for flag in warehouse["command"][1::2])
        settings = dict(option.split("=", 1) for option in options)
        assert settings["ssl"] == "on"
        for key in ("ssl_cert_file", "ssl_key_file"):
            settings[key] = str(host_path(warehouse, settings[key]))
        port = _free_port()
        with _postgres(root / "pgdata", server_user, port, settings, warehouse["environment"]["POSTGRES_USER"]):
            url, _ = _compose_warehouse()
            airflow_service = services["airflow-scheduler"]
            ca = str(host_path(airflow_service, _query(url)["sslrootcert"]))
            # host stays the compose service name that the certificate must match; hostaddr is where it runs here
            conn = psycopg2.connect(url, hostaddr="127.0.0.1", port=port, dbname="postgres", sslrootcert=ca)
            with conn.cursor() as cur:
                cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                assert cur.fetchone() == (True,)
            conn.close()
            by_address = url.replace("@warehouse:", "@127.0.0.1:")
            with pytest.raises(psycopg2.OperationalError, match="does not match host name"):
                psycopg2.connect(by_address, port=port, dbname="postgres", sslrootcert=ca)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- implementation details -------------------------------------------------------------------


def _compose_warehouse() -> tuple[str, dict]:
    """The warehouse URL the project builds from the compose file's connection (its one connection reader, as the
    CLI and the tasks read it), and the hosting the connection declares."""
    from health_ingest import config
    from health_ingest.warehouse.connection import configured_warehouse_url

    name = f"AIRFLOW_CONN_{config.WAREHOUSE_CONN_ID.upper()}"
    saved = {key: os.environ.pop(key, None) for key in (name, config.ENV_WAREHOUSE_URL)}
    os.environ[name] = _airflow_environment()[name]
    try:
        url = configured_warehouse_url()
        hosting = config.connection(config.WAREHOUSE_CONN_ID).extra_dict()["hosting"]
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return url, hosting


def _query(url: str) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(url).query))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _postgres:
    """A throwaway PostgreSQL of the machine's packages (built with TLS, as the image is) on loopback with the given
    settings, stopped on exit."""

    def __init__(self, pgdata: Path, user: str | None, port: int, settings: dict[str, str], superuser: str):
        self.pgdata, self.user, self.port, self.settings, self.superuser = pgdata, user, port, settings, superuser

    def __enter__(self):
        self.pgdata.mkdir()
        if self.user:
            shutil.chown(self.pgdata, self.user, self.user)
            for folder in self.pgdata.parent.iterdir():
                if folder.is_dir():
                    folder.chmod(folder.stat().st_mode | 0o055)
            self.pgdata.parent.chmod(0o755)
        self._run("initdb", "--auth=trust", "-U", self.superuser)
        options = " ".join(f"-c {key}={value}" for key, value in self.settings.items())
        listen = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata}"
        self._run("pg_ctl", "-w", "-o", f"{listen} {options}", "-l", str(self.pgdata / "log"), "start")
        return self

    def __exit__(self, *exc):
        self._run("pg_ctl", "-w", "-m", "immediate", "stop")

    def _run(self, program: str, *arguments: str) -> None:
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        assert binaries, "the machine's PostgreSQL server packages (CI's PostgreSQL 15 service)"
        command = [str(binaries[-1] / program), "-D", str(self.pgdata), *arguments]
        subprocess.run(command, check=True, user=self.user, stdout=subprocess.DEVNULL, timeout=120)
