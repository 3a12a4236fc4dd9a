"""A real Airflow deployment on this machine for the stack tests: api-server, scheduler, dag-processor, triggerer and
two Celery workers as separate processes, with the deployment's own settings (deploy/airflow.env, which
docker-compose.yml reads), a fresh PostgreSQL metadata database and a Redis database of their own."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SETTINGS = PROJECT / "deploy" / "airflow.env"
ADMIN = "admin"  # the user deploy/airflow.env declares for the simple auth manager


def deployment_settings() -> dict[str, str]:
    """`KEY=VALUE` lines as Compose reads an env_file: comments and blank lines skipped, values taken verbatim."""
    settings = {}
    for line in SETTINGS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value
    return settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 1.0, stack: Stack | None = None):
    """Poll `check` until it returns something truthy; on timeout, fail with the processes' recent logs."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if stack is not None:
            stack.assert_running()
        if time.monotonic() > deadline:
            logs = stack.tails() if stack else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(every)


@dataclass
class Stack:
    """The processes of one deployment; `stop()` ends each one's process group, whatever happened."""

    home: Path
    environment: dict[str, str]
    api_port: int
    password: str
    state: Path | None = None  # the project's state folder (inboxes, landing) the processes use
    warehouse_url: str = ""
    publish: Callable[[dict], object] | None = None  # puts a message on the delivery queue
    listening: Callable[[], bool] | None = None  # whether the triggerer listens on the delivery queue
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _token: str | None = None

    # --- processes ---------------------------------------------------------------------------------

    def run(self, *command: str, timeout: float = 600) -> None:
        log = self.home / f"{command[0]}-{command[1]}.log"
        with log.open("w") as out:
            code = subprocess.run(
                [_airflow(), *command], env=self.environment, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        assert code == 0, f"airflow {' '.join(command)} exited {code}:\n{_tail(log)}"

    def start(self, name: str, *command: str, extra_env: dict[str, str] | None = None) -> None:
        log = (self.home / f"{name}.log").open("w")
        self.processes[name] = subprocess.Popen(
            [_airflow(), *command],
            env={**self.environment, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends its children too
        )
        log.close()

    def start_all(self) -> None:
        self.run("db", "migrate")
        self.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.api_port))
        self.start("scheduler", "scheduler")
        self.start("dag-processor", "dag-processor")
        self.start("triggerer", "triggerer", extra_env={"AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port())})
        for number in (1, 2):
            self.start(
                f"worker{number}",
                "celery",
                "worker",
                "--celery-hostname",
                f"worker{number}@%h",
                extra_env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())},
            )

    def assert_running(self) -> None:
        ended = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        assert not ended, f"Airflow processes ended: {ended}\n{self.tails()}"

    def stop(self) -> None:
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(process, signal.SIGKILL)  # whatever is left of the group, the task processes included
            process.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- {name} ---\n{_tail(self.home / f'{name}.log')}" for name in self.processes)

    # --- REST API ----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def token(self) -> str:
        """A JWT from the simple auth manager, for the deployment's admin and the password it was given."""
        if self._token is None:
            body = {"username": ADMIN, "password": self.password}
            self._token = self.request("POST", "/auth/token", body, authorised=False)["access_token"]
        return self._token

    def request(self, method: str, path: str, body: dict | None = None, authorised: bool = True):
        headers = {"Content-Type": "application/json"}
        if authorised:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def healthy(self) -> bool:
        try:
            health = self.request("GET", "/api/v2/monitor/health", authorised=False)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return health["metadatabase"]["status"] == "healthy" and health["scheduler"]["status"] == "healthy"

    def dag_ids(self) -> set[str]:
        return {dag["dag_id"] for dag in self.request("GET", "/api/v2/dags?limit=100")["dags"]}

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def runs(self, dag_id: str) -> list[dict]:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=run_after&limit=100")["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        return self.request("GET", f"{path}?map_index={map_index}&deserialize=true")["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        content = self.request("GET", f"{path}?map_index={map_index}&full_content=true")["content"]
        return "\n".join(json.dumps(line) if isinstance(line, dict) else str(line) for line in content)


def claim_redis_database(host: str, port: int) -> int:
    """An empty database number of the machine's Redis, claimed with a key so that a concurrent run skips it."""
    import redis

    for number in range(15, 0, -1):
        client = redis.Redis(host=host, port=port, db=number)
        if client.dbsize() == 0 and client.set("health_ingest_stack_test", os.getpid(), nx=True, ex=3600):
            return number
    raise AssertionError("no empty Redis database to run the stack on")


def stack_environment(
    home: Path, *, metadata_url: str, warehouse_url: str, redis_db: int, api_port: int, extra: dict[str, str]
) -> tuple[dict[str, str], str]:
    """The processes' environment: the shared settings, then this machine's addresses, paths and secrets. The
    warehouse is given only as the Airflow connection, as in docker-compose.yml."""
    password = secrets.token_urlsafe(16)
    (home / "passwords.json").write_text(json.dumps({ADMIN: password}))
    sqlalchemy_url = metadata_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "HEALTH_INGEST_"))}
    environment = {
        **inherited,
        **deployment_settings(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sqlalchemy_url,
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata_url}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
        "AIRFLOW_CONN_HEALTH_INGEST_WAREHOUSE": warehouse_url,
        "AIRFLOW_CONN_HEALTH_INGEST_QUEUE": f"redis://127.0.0.1:6379?db={redis_db}",
        "HEALTH_INGEST_DELIVERY_CHANNEL": f"health_ingest.deliveries.{uuid.uuid4().hex[:8]}",
        **extra,
    }
    return environment, password


# --- implementation details -------------------------------------------------------------------


def _airflow() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)  # start_new_session made the process its group's leader


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
