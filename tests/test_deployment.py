"""The real deployment: Airflow's api-server, scheduler, dag-processor, triggerer and two Celery workers as
processes on this machine, metadata in PostgreSQL, Celery on Redis, the warehouse given only as the Airflow
connection. Deliveries arrive as senders really announce them (a `_READY` marker, a message on the Redis queue, the
REST API) and each becomes a committed batch with exact counts, read by the example consumer once its flat tables
are refreshed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from airflow_stack import Stack, claim_redis_database, free_port, stack_environment, wait_for
from conftest import SAMPLE, sample_line_counts

pytestmark = pytest.mark.deployment

SOURCES = {
    # two sources whose deliveries are started together through the REST API
    "clinic_a": {},
    "clinic_b": {},
    # deliveries announced by a `_READY` marker in the inbox
    "clinic_c": {},
    # deliveries announced on the message queue, from a drop folder of their own
    "clinic_d": {"allowed_roots": ["dropbox/clinic_d"]},
}
ENCOUNTER_FILES = [SAMPLE / "Patient.000.ndjson", SAMPLE / "Encounter.000.ndjson"]
# folders senders named after patients
PATIENT_LIKE_NAME = "Durand_Marie_1968"
INBOX_PERSON_LIKE_NAME = "Martin_Paul_1975"


@pytest.fixture(scope="module")
def stack():
    import psycopg2
    import redis
    from health_ingest.warehouse.connection import connect
    from health_ingest.warehouse.migrations import migrate

    admin_url = os.environ.get("HEALTH_INGEST_TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    home = Path(tempfile.mkdtemp(prefix="health-ingest-stack-"))
    suffix = uuid.uuid4().hex[:10]
    databases = {"metadata": f"hi_stack_airflow_{suffix}", "warehouse": f"hi_stack_warehouse_{suffix}"}
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    redis_db = claim_redis_database("127.0.0.1", 6379)
    deployment = None
    try:
        with admin.cursor() as cur:
            for name in databases.values():
                cur.execute(f"CREATE DATABASE {name}")
        urls = {role: _with_database(admin_url, name) for role, name in databases.items()}
        conn = connect(urls["warehouse"])
        migrate(conn)
        conn.close()

        state = home / "state"
        sources_file = home / "sources.yml"
        sources_file.write_text(json.dumps({"sources": [_source(name, extra) for name, extra in SOURCES.items()]}))
        keyring = home / "keyring.json"
        cli = str(Path(sys.executable).with_name("health-ingest"))
        subprocess.run([cli, "keys", "new", "--keyring", str(keyring)], check=True, capture_output=True)
        api_port = free_port()
        environment, password = stack_environment(
            home,
            metadata_url=urls["metadata"],
            warehouse_url=urls["warehouse"],
            redis_db=redis_db,
            api_port=api_port,
            extra={
                "HEALTH_INGEST_STATE": str(state),
                "HEALTH_INGEST_SOURCES": str(sources_file),
                "HEALTH_INGEST_KEYRING": str(keyring),
            },
        )
        deployment = Stack(home, environment, api_port, password, state=state, warehouse_url=urls["warehouse"])
        deployment.start_all()
        wait_for("the API server and the scheduler", deployment.healthy, timeout=180, stack=deployment)
        wanted = {f"fhir_{name}" for name in SOURCES} | {"delivery_messages", "example_consumer"}
        wait_for("the DAGs to be parsed", lambda: wanted <= deployment.dag_ids(), timeout=180, stack=deployment)
        for dag_id in sorted(wanted):
            deployment.unpause(dag_id)
        channel = environment["HEALTH_INGEST_DELIVERY_CHANNEL"]
        queue = redis.Redis(host="127.0.0.1", port=6379, db=redis_db)
        deployment.publish = lambda message: queue.publish(channel, json.dumps(message))
        deployment.listening = lambda: dict(queue.pubsub_numsub(channel)).get(channel.encode(), 0) > 0
        wait_for("the triggerer to listen on the queue", deployment.listening, timeout=120, stack=deployment)
        yield deployment
    finally:
        if deployment is not None:
            deployment.stop()
        redis.Redis(host="127.0.0.1", port=6379, db=redis_db).flushdb()
        with admin.cursor() as cur:
            for name in databases.values():
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
        shutil.rmtree(home, ignore_errors=True)


def test_two_sources_deliveries_started_through_the_rest_api_load_at_once_on_the_two_workers(stack):
    from health_ingest.bench.datasets import build_fhir_dataset

    # the sample under new ids in each delivery: how long a batch lasts does not matter (see below)
    counts = sample_line_counts()
    deliveries = {
        "clinic_a": stack.state / "inbox/clinic_a/delivery-001",
        "clinic_b": stack.state / f"inbox/clinic_b/{PATIENT_LIKE_NAME}",
    }
    for folder in deliveries.values():
        assert build_fhir_dataset(SAMPLE, folder, sum(counts.values())) == sum(counts.values())

    # A batch's first write is to ingest.batches (its source's abandoned batches, then its own row). Held here, the
    # table makes each batch wait as soon as it reaches the warehouse; only when both ingest tasks run, on the two
    # workers, each waiting for this lock, is it released. Anything that serialised the two sources (a pool, a lock
    # taken before that write, one worker slot) leaves one of them queued or waiting for the other: then this wait
    # times out.
    with _holding_table(stack, "ingest.batches") as holder:
        runs = {
            source: stack.request(
                "POST",
                f"/api/v2/dags/fhir_{source}/dagRuns",
                {"logical_date": None, "conf": {"delivery_path": str(path)}},
            )["dag_run_id"]
            for source, path in deliveries.items()
        }
        seen: dict = {}

        def both_waiting_at_once() -> bool:
            seen["ingest"] = {
                source: [t["state"] for t in stack.task_instances(f"fhir_{source}", run_id) if t["task_id"] == "ingest"]
                for source, run_id in runs.items()
            }
            seen["workers"] = {source: _workers_of(stack, f"fhir_{source}", run_id) for source, run_id in runs.items()}
            seen["waiting"] = _sessions_waiting_for(stack, holder)
            return (
                all(states == ["running"] for states in seen["ingest"].values())
                and sorted(w for found in seen["workers"].values() for w in found) == ["worker1", "worker2"]
                and seen["waiting"] == 2
            )

        try:
            wait_for("both ingest tasks to wait for the held table", both_waiting_at_once, timeout=240, stack=stack)
        except AssertionError as error:
            raise AssertionError(f"the two sources did not run at once: last seen {seen}") from error

    for source, run_id in runs.items():
        _wait_for_run(stack, f"fhir_{source}", run_id)
        assert _batches(stack, source) == [("committed", sum(counts.values()), sum(counts.values()), 0)]
        assert (deliveries[source] / "_DONE").exists()
    with _warehouse(stack) as cur:
        for resource_type, expected in counts.items():
            cur.execute(
                f"SELECT b.source, count(*) FROM fhir.{resource_type.lower()} JOIN ingest.batches b USING (batch_id) "
                "GROUP BY 1 ORDER BY 1"
            )
            assert cur.fetchall() == [("clinic_a", expected), ("clinic_b", expected)], resource_type

    ingest = {source: _task(stack, f"fhir_{source}", run_id, "ingest") for source, run_id in runs.items()}
    first, second = ingest["clinic_a"], ingest["clinic_b"]
    assert _at(first["start_date"]) < _at(second["end_date"]) and _at(second["start_date"]) < _at(first["end_date"]), (
        "the two batches ran at the same time"
    )
    workers = {source: _worker_of(stack, f"fhir_{source}", runs[source]) for source in runs}
    assert sorted(workers.values()) == ["worker1", "worker2"], workers

    # the UI names each mapped task by its delivery's label, never by a folder named after a person
    assert first["rendered_map_index"] == "delivery-001"
    assert second["rendered_map_index"].startswith("delivery-2") and "Durand" not in second["rendered_map_index"]
    # nor does any XCom or task argument Airflow keeps of the run (its conf, the operator's own input, does)
    kept = _kept_by_airflow(stack, "fhir_clinic_b", runs["clinic_b"])
    assert "Durand" not in kept and second["rendered_map_index"] in kept

    _assert_consumer_read_each_batch(stack, ["clinic_a", "clinic_b"], counts["Encounter"])

    # the Asset events name the warehouse of the connection, the one the consumer is scheduled on
    database = stack.warehouse_url.rsplit("/", 1)[1]
    flat = stack.request("GET", "/api/v2/assets?uri_pattern=flat/encounter")["assets"]
    assert [asset["uri"] for asset in flat] == [f"postgres://127.0.0.1:5432/{database}/flat/encounter"]
    assert [dag["dag_id"] for dag in flat[0]["scheduled_dags"]] == ["example_consumer"]
    # every table's Asset was declared before its first event: none made by an event (two sources' first events
    # for one table would both make it), none inactive
    made = [line for line in stack.log("api-server").splitlines() if "AssetModel" in line]
    assert made == [], "\n".join(made[:5])


def test_a_ready_marker_in_an_inbox_becomes_a_committed_batch(stack):
    folder = _delivery(stack, f"inbox/clinic_c/{INBOX_PERSON_LIKE_NAME}", ENCOUNTER_FILES)
    (folder / "_READY").touch()

    wait_for("the batch of the marked delivery", lambda: _batches(stack, "clinic_c"), timeout=240, stack=stack)
    (run,) = wait_for("its DAG run", lambda: stack.runs("fhir_clinic_c"), timeout=60, stack=stack)
    _wait_for_run(stack, "fhir_clinic_c", run["dag_run_id"])
    assert run["run_type"] == "asset_triggered"
    assert _batches(stack, "clinic_c") == [("committed", 13 + 1215, 13 + 1215, 0)]
    assert (folder / "_DONE").exists() and not (folder / "_QUEUED").exists()
    # found in the inbox, it travels from the task that found it to the one that loaded it by a keyed reference
    (found,) = stack.xcom("fhir_clinic_c", run["dag_run_id"], "find_deliveries")
    assert found["where"] == "inbox" and found["label"].startswith("delivery-2")
    with _warehouse(stack) as cur:
        cur.execute("SELECT delivery FROM ingest.batches WHERE source = 'clinic_c'")
        assert cur.fetchone() == (found["ref"],), "the keyed label the batch stores"
    assert "Martin" not in _kept_by_airflow(stack, "fhir_clinic_c", run["dag_run_id"])
    _assert_consumer_read_each_batch(stack, ["clinic_c"], 1215)


def test_a_message_on_the_queue_loads_its_delivery_and_one_outside_the_allowed_roots_is_refused(stack):
    outside = _delivery(stack, "elsewhere/export-0001", ENCOUNTER_FILES)  # readable, but no source's root
    inside = _delivery(stack, "dropbox/clinic_d/export-0001", ENCOUNTER_FILES)

    stack.publish({"source": "clinic_d", "delivery": str(outside)})
    (refused_run,) = wait_for("the refused message's run", lambda: stack.runs("delivery_messages"), 120, stack=stack)
    _wait_for_run(stack, "delivery_messages", refused_run["dag_run_id"])
    log = stack.task_log("delivery_messages", refused_run["dag_run_id"], "route_messages")
    assert "refused, not loaded: source 'clinic_d': the delivery is outside the source's allowed roots" in log
    assert str(outside) not in log, "the folder is not quoted"
    assert stack.runs("fhir_clinic_d") == []

    wait_for("the triggerer to listen again", stack.listening, timeout=60, stack=stack)
    stack.publish({"source": "clinic_d", "delivery": str(inside)})
    wait_for("the batch of the announced delivery", lambda: _batches(stack, "clinic_d"), timeout=240, stack=stack)
    (run,) = stack.runs("fhir_clinic_d")
    _wait_for_run(stack, "fhir_clinic_d", run["dag_run_id"])
    assert run["conf"] == {"delivery_path": str(inside)}
    assert _batches(stack, "clinic_d") == [("committed", 13 + 1215, 13 + 1215, 0)]
    with _warehouse(stack) as cur:
        cur.execute("SELECT count(*) FROM ingest.batches WHERE source = 'clinic_d'")
        assert cur.fetchone() == (1,), "the refused message loaded nothing"
    _assert_consumer_read_each_batch(stack, ["clinic_d"], 1215)


def test_a_delivery_path_outside_the_sources_allowed_roots_fails_the_run_without_loading(stack):
    outside = _delivery(stack, "elsewhere/export-0002", ENCOUNTER_FILES)
    run_id = stack.request(
        "POST", "/api/v2/dags/fhir_clinic_c/dagRuns", {"logical_date": None, "conf": {"delivery_path": str(outside)}}
    )["dag_run_id"]
    run = _wait_for_run(stack, "fhir_clinic_c", run_id, expect="failed")
    assert run["state"] == "failed"
    find = _task(stack, "fhir_clinic_c", run_id, "find_deliveries")
    assert find["state"] == "failed" and find["try_number"] == 1, "refused without retry"
    assert "outside the source's allowed roots" in stack.task_log("fhir_clinic_c", run_id, "find_deliveries")
    with _warehouse(stack) as cur:
        cur.execute("SELECT count(*) FROM ingest.batches WHERE source = 'clinic_c'")
        assert cur.fetchone() == (1,), "only the marked delivery's batch"


# --- implementation details -------------------------------------------------------------------


def _source(name: str, extra: dict) -> dict:
    return {
        "name": name,
        "kind": "fhir",
        "format": "ndjson",
        "inbox": f"inbox/{name}",
        "owner": "data-engineering",
        "retries": 0,
        **extra,
    }


def _delivery(stack: Stack, relative: str, files: list[Path]) -> Path:
    folder = stack.state / relative
    folder.mkdir(parents=True)
    for path in files:
        shutil.copy(path, folder)
    return folder


def _warehouse(stack: Stack):
    import psycopg2

    @contextlib.contextmanager
    def cursor():
        conn = psycopg2.connect(stack.warehouse_url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    return cursor()


def _batches(stack: Stack, source: str) -> list[tuple]:
    with _warehouse(stack) as cur:
        cur.execute(
            "SELECT status, rows_read, rows_loaded, rows_quarantined FROM ingest.batches WHERE source = %s "
            "AND status <> 'loading' ORDER BY started_at",
            (source,),
        )
        return cur.fetchall()


def _wait_for_run(stack: Stack, dag_id: str, run_id: str, expect: str = "success") -> dict:
    def finished():
        run = stack.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        return run if run["state"] in {"success", "failed"} else None

    run = wait_for(f"DAG run {dag_id}/{run_id}", finished, timeout=300, stack=stack)
    if run["state"] != expect:
        tasks = stack.task_instances(dag_id, run_id)
        states = {(t["task_id"], t["map_index"]): t["state"] for t in tasks}
        logs = [
            stack.task_log(dag_id, run_id, t["task_id"], max(t["try_number"], 1), t["map_index"])
            for t in tasks
            if t["state"] == "failed"
        ]
        failed = [t.get("id") or "(no id)" for t in tasks if t["state"] == "failed"]
        raise AssertionError(
            f"{dag_id}/{run_id} ended {run['state']}: {states}\n"
            + "\n".join(logs)
            + _server_lines_about(stack, failed)
            + stack.tails()
        )
    return run


def _server_lines_about(stack: Stack, task_ids: list[str]) -> str:
    """The API server's lines about these task instances, and its errors with their tracebacks: a task can end
    failed there (its state update refused) while its own log ends normally."""
    lines = stack.log("api-server").splitlines()
    kept = [
        "\n".join(lines[n : n + (40 if "Traceback" in line else 1)])
        for n, line in enumerate(lines)
        if any(task_id in line for task_id in task_ids) or "Traceback" in line or "[error" in line
    ]
    return "\n--- api-server, about the failed tasks ---\n" + "\n".join(kept[-60:]) + "\n"


def _task(stack: Stack, dag_id: str, run_id: str, task_id: str) -> dict:
    (task,) = [t for t in stack.task_instances(dag_id, run_id) if t["task_id"] == task_id]
    return task


def _worker_of(stack: Stack, dag_id: str, run_id: str) -> str:
    """The Celery worker whose log shows it executing the run's ingest task."""
    found = _workers_of(stack, dag_id, run_id)
    assert len(found) == 1, (dag_id, found)
    return found[0]


def _workers_of(stack: Stack, dag_id: str, run_id: str) -> list[str]:
    return [
        name
        for name in ("worker1", "worker2")
        for line in stack.log(name).splitlines()
        if "Executing workload" in line and dag_id in line and run_id in line and "task_id='ingest'" in line
    ]


@contextlib.contextmanager
def _holding_table(stack: Stack, table: str):
    """A transaction of the test's own holding `table` in EXCLUSIVE mode (reads go on, writes wait) until the block
    ends; yields its server process id. A plain session: none of the project's session settings (its
    idle-in-transaction timeout) ends it while it waits."""
    import psycopg2

    conn = psycopg2.connect(stack.warehouse_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            cur.execute("SELECT pg_backend_pid()")
            yield cur.fetchone()[0]
    finally:
        conn.rollback()
        conn.close()


def _sessions_waiting_for(stack: Stack, holder: int) -> int:
    """How many of the project's warehouse sessions wait for a lock the session `holder` holds."""
    with _warehouse(stack) as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'health-ingest' AND %s = ANY(pg_blocking_pids(pid))",
            (holder,),
        )
        return cur.fetchone()[0]


def _kept_by_airflow(stack: Stack, dag_id: str, run_id: str) -> str:
    """What Airflow keeps of a run, as its REST API gives it: every XCom (as stored, and deserialised) and the task
    instances (their rendered arguments and names), as one JSON text."""
    base = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
    entries = stack.request("GET", f"{base}/~/xcomEntries?limit=100")["xcom_entries"]
    assert {entry["task_id"] for entry in entries} >= {"find_deliveries", "ingest"}, entries
    values = []
    for entry in entries:
        path = f"{base}/{entry['task_id']}/xcomEntries/{entry['key']}?map_index={entry['map_index']}"
        values += [stack.request("GET", path)["value"], stack.request("GET", f"{path}&deserialize=true")["value"]]
    return json.dumps({"xcom": values, "task_instances": stack.task_instances(dag_id, run_id)}, default=str)


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _assert_consumer_read_each_batch(stack: Stack, sources: list[str], encounters: int) -> None:
    """For each committed batch of these sources, a consumer run that started after the batch's flat tables were
    refreshed read exactly its rows in fhir.encounter and in flat.encounter."""
    with _warehouse(stack) as cur:
        cur.execute(
            "SELECT batch_id::text, committed_at FROM ingest.batches WHERE status = 'committed' AND source = ANY(%s)",
            (sources,),
        )
        committed = dict(cur.fetchall())

    def reads() -> dict[str, tuple[dict, str]]:
        seen = {}
        for run in stack.runs("example_consumer"):
            if run["state"] == "success":
                value = stack.xcom("example_consumer", run["dag_run_id"], "read_new_encounters")
                for batch_id, rows in value.items():
                    seen[batch_id] = (rows, run["start_date"])
        return seen if set(committed) <= set(seen) else None

    seen = wait_for("the example consumer to read each batch", reads, timeout=180, every=3, stack=stack)
    for batch_id, committed_at in committed.items():
        rows, started = seen[batch_id]
        assert rows == {"fhir.encounter": encounters, "flat.encounter": encounters}, batch_id
        assert _at(started) > committed_at, "the consumer ran after the commit"


def _with_database(url: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))
