"""Faults injected into real runs: hostile files, crashes, lost connections, races. Each must end clean: a clear
error or a quarantined record, nothing partial in the warehouse, no process or lock left behind."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import pytest
from conftest import SAMPLE, TEST_DATA, sample_line_counts

pytestmark = pytest.mark.faults

MiB = 1 << 20


# --- hostile files ----------------------------------------------------------------------------


def test_a_link_out_of_the_delivery_is_refused_and_nothing_of_it_is_landed(tmp_path, warehouse_url):
    secret = tmp_path / "keyring.json"
    secret.write_text('{"resourceType": "Patient", "id": "outside"}\n')
    delivery = tmp_path / "delivery"
    delivery.mkdir()
    (delivery / "Patient.000.ndjson").write_bytes((SAMPLE / "Patient.000.ndjson").read_bytes())
    (delivery / "Patient.901.ndjson").symlink_to(secret)
    os.mkfifo(delivery / "Encounter.000.ndjson")  # would block a reader forever

    run = _cli("ingest", "fhir", str(delivery), "--source", "smart_sample")
    assert run.returncode == 4 and "Encounter.000.ndjson: a FIFO; a delivery holds regular files only" in run.stderr
    (delivery / "Encounter.000.ndjson").unlink()

    run = _cli("ingest", "fhir", str(delivery), "--source", "smart_sample")

    assert run.returncode == 4, run.stderr
    assert "Patient.901.ndjson: a symbolic link; a delivery holds regular files only" in run.stderr
    assert "Traceback" not in run.stderr
    landing = Path(os.environ["HEALTH_INGEST_STATE"]) / "landing" / "smart_sample"
    assert not any(p.name == "Patient.901.ndjson" for p in landing.rglob("*")), "the partial landing copy is gone"
    assert oct(landing.stat().st_mode & 0o777) == "0o700"


def test_the_hosting_check_judges_the_hosts_libpq_connects_to(tmp_path, warehouse_url, monkeypatch):
    from health_ingest.warehouse.jurisdiction import JurisdictionRefused, check_warehouse, libpq_endpoint

    for variable in ("PGHOST", "PGHOSTADDR", "PGSERVICE", "PGSERVICEFILE", "PGSSLMODE"):
        monkeypatch.delenv(variable, raising=False)
    refused = {
        "postgresql://u@127.0.0.1/wh?host=db.example.com": "db.example.com",
        "postgresql://u@localhost/wh?hostaddr=203.0.113.7": "203.0.113.7",
        "postgresql://u@127.0.0.1,db.example.com/wh": "db.example.com",
    }
    for url, host in refused.items():
        with pytest.raises(JurisdictionRefused, match=f"rule 'declaration-required'.*{host}"):
            check_warehouse(url, None)
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text("[warehouse]\nhost=db.example.com\ndbname=wh\n")
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    with pytest.raises(JurisdictionRefused, match=r"db\.example\.com"):
        check_warehouse("postgresql:///wh?service=warehouse", None)
    monkeypatch.setenv("PGHOST", "db.example.com")
    with pytest.raises(JurisdictionRefused, match=r"db\.example\.com"):
        check_warehouse("postgresql:///wh", None)
    monkeypatch.delenv("PGHOST")

    # and the other way: a remote-looking authority that libpq overrides with the test server's own host
    from urllib.parse import quote

    from psycopg2.extensions import parse_dsn

    real = parse_dsn(warehouse_url)
    query = f"host={quote(real.get('host', '/tmp'), safe='')}&port={real.get('port', 5432)}"
    disguised = f"postgresql://{real.get('user', 'postgres')}@db.example.com/{real['dbname']}?{query}"
    assert libpq_endpoint(disguised).hosts == (real.get("host", "/tmp"),)
    check_warehouse(disguised, None)
    with psycopg2.connect(disguised) as conn, conn.cursor() as cur:  # libpq agrees: it reaches the test server
        cur.execute("SELECT current_database()")
        assert cur.fetchone()[0] == real["dbname"]


def test_each_bad_record_is_quarantined_with_its_line_and_the_rest_loads(tmp_path, db, monkeypatch):
    from health_ingest.batch.fhir import run_fhir_batch
    from health_ingest.sources.registry import get_source

    monkeypatch.setenv("HEALTH_INGEST_MAX_LINE_BYTES", str(MiB))
    # deep inside elements the pseudonymiser keeps (a contained Questionnaire's nested items)
    deep: dict = {"linkId": "leaf", "type": "display"}
    for _ in range(150):
        deep = {"linkId": "group", "type": "group", "item": [deep]}
    good = [json.loads(line) for line in (SAMPLE / "Patient.000.ndjson").read_text().splitlines()[:3]]
    lines = [
        json.dumps(good[0]),  # 1
        json.dumps(
            {
                "resourceType": "Patient",
                "id": "deep",
                "contained": [{"resourceType": "Questionnaire", "id": "q", "status": "draft", "item": [deep]}],
            }
        ),  # 2
        json.dumps({**good[1], "id": "sys-obj", "identifier": [{"system": {"a": 1}, "value": "123-45-6789"}]}),  # 3
        json.dumps({"resourceType": "Patient", "id": "sec", "meta": {"security": {"code": "R"}}}),  # 4
        json.dumps({"resourceType": "Patient", "id": "tz", "meta": {"lastUpdated": "2024-01-01T00:00:00+23:59"}}),
        json.dumps({"resourceType": "Patient", "id": "newline\n"}),  # 6
        '{"resourceType": "Patient", "id": "long", "x": "' + "y" * (2 * MiB) + '"}',  # 7
        json.dumps(good[2]),  # 8
    ]
    delivery = tmp_path / "delivery"
    delivery.mkdir()
    (delivery / "Patient.000.ndjson").write_text("\n".join(lines) + "\n")

    result = run_fhir_batch(delivery, _without_ceiling(get_source("smart_sample")))

    assert (result.rows_read, result.rows_loaded, result.rows_quarantined) == (8, 2, 6)
    with db.cursor() as cur:
        cur.execute("SELECT file_name, line_number, reason FROM ingest.quarantine ORDER BY line_number")
        assert cur.fetchall() == [
            ("Patient.000.ndjson", 2, "too_deep"),
            ("Patient.000.ndjson", 3, "invalid_identifier"),
            ("Patient.000.ndjson", 4, "invalid_meta"),
            ("Patient.000.ndjson", 5, "invalid_last_updated"),
            ("Patient.000.ndjson", 6, "invalid_id"),
            ("Patient.000.ndjson", 7, "line_too_long"),
        ]
        cur.execute("SELECT count(*) FROM fhir.patient")
        assert cur.fetchone()[0] == 2


def test_a_nul_byte_in_a_claims_value_is_quarantined_with_its_line(tmp_path, db):
    from health_ingest.batch.claims import run_claims_batch
    from health_ingest.sources.registry import get_source

    source = TEST_DATA / "synthetic-snds" / "DCIR" / "ER_PHA_F.csv"
    lines = source.read_bytes().splitlines(keepends=True)
    header = lines[0].decode()
    column = header.rstrip("\r\n").split(",").index("PHA_CPA_PCP")
    cells = lines[2].decode().rstrip("\r\n").split(",")
    cells[column] = "a\0b"
    lines[2] = (",".join(cells) + "\n").encode()
    delivery = tmp_path / "dcir"
    delivery.mkdir()
    (delivery / "ER_PHA_F.csv").write_bytes(b"".join(lines))

    result = run_claims_batch(delivery, get_source("snds_extract"))

    assert result.rows_read == len(lines) - 1 and result.rows_quarantined == 1
    with db.cursor() as cur:
        cur.execute("SELECT file_name, line_number, reason FROM ingest.quarantine")
        assert cur.fetchall() == [("ER_PHA_F.csv", 3, "nul_character")]


def test_numbers_are_stored_as_written(tmp_path, db):
    from health_ingest.batch.fhir import run_fhir_batch
    from health_ingest.sources.registry import get_source

    patient = (SAMPLE / "Patient.000.ndjson").read_text().splitlines()[0]
    subject = json.dumps({"reference": f"Patient/{json.loads(patient)['id']}"})
    written = ["1.50", "0.123456789012345678901", "123456789012345678901234567890", "1.0e5", "1e20", "2.25", "100.0"]
    lines = [
        f'{{"resourceType": "Observation", "id": "obs-{n}", "status": "final", "subject": {subject}, '
        f'"valueQuantity": {{"value": {value}}}}}'
        for n, value in enumerate(written)
    ]
    delivery = tmp_path / "delivery"
    delivery.mkdir()
    (delivery / "Patient.000.ndjson").write_text(patient + "\n")
    (delivery / "Observation.000.ndjson").write_text("\n".join(lines) + "\n")
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": "in-bundle",
                    "subject": json.loads(subject),
                    "status": "final",
                }
            },
            7,
        ],
    }
    (delivery / "extra.json").write_text(
        json.dumps(bundle).replace('"status": "final"}', '"status": "final", "valueQuantity": {"value": 3.140}}')
    )

    result = run_fhir_batch(delivery, _without_ceiling(get_source("smart_sample")))

    assert result.rows_quarantined == 1, "the Bundle entry that is not an object is counted"
    with db.cursor() as cur:
        cur.execute("SELECT resource->'valueQuantity'->>'value' FROM fhir.observation WHERE resource ? 'valueQuantity'")
        stored = sorted(row[0] for row in cur.fetchall())
    # every digit written is kept; jsonb writes an exponent's value in full
    expected = [
        "1.50",
        "0.123456789012345678901",
        "123456789012345678901234567890",
        "100000",
        "100000000000000000000",
        "2.25",
        "100.0",
        "3.140",  # from the Bundle
    ]
    assert stored == sorted(expected)


def test_a_gzip_bomb_and_a_huge_field_are_refused_within_a_memory_ceiling(tmp_path, warehouse_url):
    ceiling_mib = 400
    member = gzip.compress(b"\0" * (64 * MiB), compresslevel=9)
    fhir = tmp_path / "fhir"
    fhir.mkdir()
    with (fhir / "Patient.000.ndjson.gz").open("wb") as out:  # 4 GiB of zeros, one line, in a few MiB
        for _ in range(64):
            out.write(member)
    run, peak_mib = _cli_with_peak("ingest", "fhir", str(fhir), "--source", "smart_sample")
    assert run.returncode == 4, run.stderr
    assert "decompresses more than 200 times its size" in run.stderr and "Traceback" not in run.stderr
    assert peak_mib < ceiling_mib

    claims = tmp_path / "claims"
    claims.mkdir()
    header = (TEST_DATA / "synthetic-snds" / "DCIR" / "ER_PHA_F.csv").read_bytes().splitlines()[0]
    with (claims / "ER_PHA_F.csv").open("wb") as out:  # one unquoted field of 300 MiB
        out.write(header + b"\n")
        block = b"x" * (4 * MiB)
        for _ in range(75):
            out.write(block)
        out.write(b"\n")
    run, peak_mib = _cli_with_peak("ingest", "claims", str(claims), "--source", "snds_extract")
    assert run.returncode == 4, run.stderr
    assert "longer than 67108864 bytes (HEALTH_INGEST_MAX_LINE_BYTES)" in run.stderr and "Traceback" not in run.stderr
    assert peak_mib < ceiling_mib

    plain = tmp_path / "plain"
    plain.mkdir()
    with (plain / "Patient.000.ndjson").open("wb") as out:  # a 300 MiB line between two good ones
        out.write((SAMPLE / "Patient.000.ndjson").read_bytes().splitlines(keepends=True)[0])
        out.write(b'{"resourceType": "Patient", "id": "huge", "x": "')
        for _ in range(75):
            out.write(block)
        out.write(b'"}\n')
        out.write((SAMPLE / "Patient.000.ndjson").read_bytes().splitlines(keepends=True)[1])
    run, peak_mib = _cli_with_peak("ingest", "fhir", str(plain), "--source", "smart_sample")
    assert run.returncode == 0, run.stderr
    assert peak_mib < ceiling_mib
    with psycopg2.connect(warehouse_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT line_number, reason FROM ingest.quarantine")
        assert cur.fetchall() == [(2, "line_too_long")]


# --- crashes and lost connections ------------------------------------------------------------


def test_a_killed_ingest_leaves_nothing_running_and_the_next_run_commits_in_seconds(tmp_path, db):
    """`kill -9` of the main process while it lands, stages and merges a 100k-resource delivery: its workers die
    with it, the server releases its transaction and lock, and the next run clears the abandoned batch and commits
    the exact counts."""
    from health_ingest.bench.datasets import build_fhir_dataset

    delivery = tmp_path / "fhir"
    resources = build_fhir_dataset(SAMPLE, delivery, 100_000)
    points = {
        "reading": "SELECT count(*) FROM ingest.batches WHERE status = 'loading'",
        "staging": _activity("COPY %"),
        "merging": _activity("%INSERT INTO fhir.%"),
    }
    for point, probe in points.items():
        process = _start_cli("ingest", "fhir", str(delivery), "--source", "smart_sample", "--quiet")
        assert _wait_for(db, probe, process), f"the batch ended before it was {point}"
        workers = _children(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed = time.monotonic()
        # the batch process alone held its sessions: the server ends them at once (a busy one within the 2 s of
        # `client_connection_check_interval`), and with them its transaction and its source's lock
        with db.cursor() as cur:
            while time.monotonic() < killed + 5:
                cur.execute(_BATCH_SESSIONS)
                if cur.fetchone()[0] == 0:
                    break
                time.sleep(0.01)
            released = time.monotonic() - killed
            cur.execute(_BATCH_SESSIONS)
            assert cur.fetchone()[0] == 0 and released < 3, f"sessions left {released:.1f} s after a kill while {point}"
        deadline = time.monotonic() + 5
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(workers), f"workers outlived the batch process killed while {point}"

    with db.cursor() as cur:
        cur.execute("SELECT clock_timestamp()")
        rerun_at = cur.fetchone()[0]
    started = time.monotonic()
    run = _cli("ingest", "fhir", str(delivery), "--source", "smart_sample", "--quiet")
    elapsed = time.monotonic() - started
    with db.cursor() as cur:  # the abandoned batch is cleared as the run starts, not after any timeout
        cur.execute("SELECT max(finished_at) - %s FROM ingest.batches WHERE status = 'failed'", (rerun_at,))
        assert cur.fetchone()[0].total_seconds() < 10

    assert run.returncode == 0, run.stderr
    assert run.stderr.count("was left loading by a process that is gone") == 1  # the last; the others were cleared
    with db.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM ingest.batches GROUP BY 1 ORDER BY 1")
        assert cur.fetchall() == [("committed", 1), ("failed", len(points))]
        cur.execute("SELECT batch_id::text FROM ingest.batches WHERE status = 'failed'")
        landing = Path(os.environ["HEALTH_INGEST_STATE"]) / "landing" / "smart_sample"
        assert not any((landing / batch_id / ".spool").exists() for (batch_id,) in cur.fetchall()), "spools removed"
        cur.execute("SELECT rows_read, rows_loaded + rows_quarantined FROM ingest.batches WHERE status = 'committed'")
        assert cur.fetchone() == (resources, resources)
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'ingest_staging'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT sum(rows_loaded) FROM ingest.batch_files")
        loaded = cur.fetchone()[0]
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'fhir'")
        stored = 0
        for (table,) in cur.fetchall():
            cur.execute(f"SELECT count(*) FROM fhir.{table}")
            stored += cur.fetchone()[0]
        assert stored == loaded
    assert elapsed < 30, "the re-run commits within 30 s"


def test_a_batch_s_sessions_end_with_its_process_whatever_becomes_of_processes_forked_from_it(warehouse_url):
    """A worker is forked from the batch's process, with copies of the sockets of its warehouse sessions: its copies
    are pointed at /dev/null when it starts, so that the batch's lock is released the moment the batch's process
    dies, even while a process forked from it still lives; and the batch's own sessions go on unharmed."""
    from health_ingest.batch.workers import WorkerPool
    from health_ingest.warehouse.connection import connect

    conn = connect(warehouse_url)
    with WorkerPool(_nothing, (), workers=2) as pool:
        assert list(pool.in_order([(_is_a_socket, conn.fileno())] * 4)) == [False] * 4
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,), "the batch's session is whole"
    conn.close()

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_LOCK_AND_FORK, warehouse_url], stdout=subprocess.PIPE, text=True
    )
    forked = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        killed = time.monotonic()
        with psycopg2.connect(warehouse_url) as watcher, watcher.cursor() as cur:
            while time.monotonic() < killed + 5:
                cur.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
                if cur.fetchone()[0] == 0:
                    break
                time.sleep(0.01)
            assert time.monotonic() - killed < 1, "the lock is released once its process is gone"
        assert _alive([forked]), "while the process forked from it still lives"
    finally:
        os.kill(forked, signal.SIGKILL)


_HOLD_A_LOCK_AND_FORK = """
import os, sys, time
from health_ingest.warehouse.connection import connect, release_inherited_connections
conn = connect(sys.argv[1])
conn.autocommit = True
conn.cursor().execute("SELECT pg_advisory_lock(4242)")
forked = os.fork()
if forked == 0:  # as a batch's worker starts
    release_inherited_connections()
    time.sleep(60)
    os._exit(0)
print(forked, flush=True)
time.sleep(60)
"""


def _nothing() -> None:
    pass


def _is_a_socket(fd: int) -> bool:
    import stat

    return stat.S_ISSOCK(os.fstat(fd).st_mode)


@pytest.mark.parametrize("statement", ["COPY %", "%INSERT INTO fhir.%"], ids=["mid-copy", "mid-merge"])
def test_a_lost_connection_fails_the_batch_cleanly_and_drops_its_staging(tmp_path, db, statement):
    from health_ingest.bench.datasets import build_fhir_dataset

    delivery = tmp_path / "fhir"
    build_fhir_dataset(SAMPLE, delivery, 30_000)
    process = _start_cli("ingest", "fhir", str(delivery), "--source", "smart_sample", "--quiet")
    assert _wait_for(db, _activity(statement), process)
    with db.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'health-ingest' "
            "AND datname = current_database() AND pid <> pg_backend_pid()"
        )
    _, err = process.communicate(timeout=120)

    assert process.returncode == 4, err
    assert "the connection to the warehouse was lost" in err or "57P01" in err
    assert "Traceback" not in err
    with db.cursor() as cur:
        cur.execute("SELECT status, error FROM ingest.batches")
        [(status, error)] = cur.fetchall()
        assert status == "failed" and "while" in error
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'ingest_staging'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'fhir'")
        assert cur.fetchone()[0] == 0, "nothing of the batch was committed"


def test_two_sources_creating_the_same_tables_at_once_both_commit(db):
    runs = [
        _start_cli("ingest", "fhir", str(SAMPLE), "--source", "smart_sample", "--quiet"),
        _start_cli("ingest", "fhir", str(TEST_DATA / "synthea-ma11" / "fhir"), "--source", "synthea_fhir", "--quiet"),
    ]
    results = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err
    with db.cursor() as cur:
        cur.execute("SELECT source, status FROM ingest.batches ORDER BY source")
        assert cur.fetchall() == [("smart_sample", "committed"), ("synthea_fhir", "committed")]
        cur.execute("SELECT count(DISTINCT batch_id) FROM fhir.patient")
        assert cur.fetchone()[0] == 2


# --- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk():
    """Mounts a real file system of a given size (a tmpfs) on a folder, and unmounts it after the test: its disk
    really fills (ENOSPC), as a landing zone's volume does. Mounting needs root (CAP_SYS_ADMIN): where it is
    refused, the test cannot run, and says why."""
    mounted: list[Path] = []

    def mount(folder: Path, size: int, owner: int | None = None) -> Path:
        folder.mkdir(parents=True)
        options = f"size={size},mode=0700" + (f",uid={owner}" if owner is not None else "")
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("cannot fill a real disk: no mount command on this machine")
        if run.returncode != 0:
            said = (run.stderr.strip().splitlines() or [f"mount exited {run.returncode}"])[0]
            pytest.skip(
                "cannot fill a real disk: mounting a small file system needs root (CAP_SYS_ADMIN), and this "
                f"machine refused it ({said})"
            )
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


@pytest.fixture
def server_reachable_folder():
    """A folder the database server's own user can reach (a test's `tmp_path` is its runner's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="health-ingest-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    ("kind", "delivery", "source"),
    [("fhir", SAMPLE, "smart_sample"), ("claims", TEST_DATA / "synthea-ma11" / "csv", "synthea_claims")],
    ids=["fhir", "claims"],
)
def test_a_full_landing_disk_fails_the_batch_cleanly_and_frees_what_it_took(
    tmp_path, db, small_disk, kind, delivery, source
):
    """The landing zone on a file system of its own (four times the delivery), filled by another file: first so
    that the delivery's copy does not fit, then so that the copy fits and its spools do not. Each time the batch
    fails with an error that names the full disk and where the batch was, nothing of it is committed or left
    staged, and what it wrote on that disk is removed, to the byte. With the space back, the same source commits."""
    size = sum(path.stat().st_size for path in delivery.iterdir())
    state = tmp_path / "state"
    landing = small_disk(state / "landing", 4 * size)
    env = {"HEALTH_INGEST_STATE": str(state)}
    other = landing / "another-file"
    schema = "fhir" if kind == "fhir" else "claims"
    disk_full = r"\(\d+\.\d MiB free of \d+\.\d MiB on that disk now\)"
    failures = {
        size // 2: (
            "landing the delivery",
            "landing the delivery failed: no space left on the landing zone's disk; the partial copy was removed "
            + disk_full,
        ),
        size + MiB: (
            "(reading|after) ",
            r"no space left on the landing zone's disk (while|after) [^;]+; the batch's landing copy and spools "
            r"were removed " + disk_full,
        ),
    }
    for free, (failed_step, message) in failures.items():
        other.unlink(missing_ok=True)
        fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
        os.posix_fallocate(fd, 0, _free_bytes(landing) - free)
        os.close(fd)
        before = _free_bytes(landing)
        assert before < 4 * size // 2, "the disk is mostly taken before the batch starts"

        run = _cli("ingest", kind, str(delivery), "--source", source, "--quiet", **env)

        assert run.returncode == 4, run.stderr
        assert re.search(f"failed: {message}", run.stderr), run.stderr
        assert "Traceback" not in run.stderr and "where it failed" not in run.stderr
        assert _free_bytes(landing) == before, "what the batch wrote on the full disk is removed"
        assert [path for path in landing.rglob("*") if not path.is_dir()] == [other]
        with db.cursor() as cur:
            cur.execute("SELECT status, failed_step, error FROM ingest.batches ORDER BY started_at DESC LIMIT 1")
            status, step, error = cur.fetchone()
            assert status == "failed" and re.match(failed_step, step) and re.fullmatch(message, error), error
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'ingest_staging'")
            assert cur.fetchone()[0] == 0, "the failed batch's staging is dropped"
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,))
            tables = cur.fetchone()[0]
            assert tables == 0, "nothing of the batch was committed"

    other.unlink()
    run = _cli("ingest", kind, str(delivery), "--source", source, "--quiet", **env)

    assert run.returncode == 0, run.stderr
    with db.cursor() as cur:
        cur.execute("SELECT status, rows_read, rows_loaded + rows_quarantined FROM ingest.batches ORDER BY started_at")
        batches = cur.fetchall()
    assert [status for status, *_ in batches] == ["failed", "failed", "committed"]
    assert batches[-1][1] == batches[-1][2] == _records_in(kind, delivery)


def test_a_full_warehouse_disk_fails_the_batch_cleanly_and_the_same_delivery_commits_once_there_is_room(
    tmp_path, db, pg_admin_url, warehouse_url, server_reachable_folder, small_disk
):
    """The warehouse's new tables on a disk of their own (a tablespace on a small file system, the database's
    default), too small for the batch: PostgreSQL stops it with 53100. The batch fails with an error that says the
    warehouse's disk is full and where the batch was, nothing of it is committed or left staged, and the space it
    took comes back. With a larger disk, the same delivery commits its exact counts."""
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    tablespace, database = f"hi_small_{tmp_path.name[-8:].lower()}", warehouse_url.rsplit("/", 1)[1]
    with admin.cursor() as cur:
        cur.execute("SHOW data_directory")
        owner = os.stat(cur.fetchone()[0]).st_uid  # the server's own user writes the tablespace
    disk = small_disk(server_reachable_folder / "tablespace", 3 * MiB, owner=owner)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE TABLESPACE {tablespace} LOCATION %s", (str(disk),))
            cur.execute(f"ALTER DATABASE {database} SET default_tablespace = {tablespace}")
        before = _free_bytes(disk)

        run = _cli("ingest", "fhir", str(SAMPLE), "--source", "smart_sample", "--quiet")

        assert run.returncode == 4, run.stderr
        message = (
            r"no space left on the warehouse's disk \(PostgreSQL error 53100: could not extend file \"\.\.\.\": "
            r"No space left on device\) while [^\n]+"
        )
        assert re.search(f"failed: {message}", run.stderr), run.stderr
        assert "Traceback" not in run.stderr
        with db.cursor() as cur:
            cur.execute("SELECT status, failed_step, error FROM ingest.batches")
            [(status, step, error)] = cur.fetchall()
            assert status == "failed" and step and re.fullmatch(message, error), error
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname IN ('ingest_staging', 'fhir')")
            assert cur.fetchone()[0] == 0, "nothing of the batch is committed or left staged"
            cur.execute("CHECKPOINT")  # a dropped table's files are removed by the next checkpoint
        assert _free_bytes(disk) == before, "the space the batch took comes back"

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, timeout=30)
        run = _cli("ingest", "fhir", str(SAMPLE), "--source", "smart_sample", "--quiet")

        assert run.returncode == 0, run.stderr
        with db.cursor() as cur:
            cur.execute("SELECT status, rows_read, rows_loaded FROM ingest.batches ORDER BY started_at")
            (failed, _, nothing), committed = cur.fetchall()  # the failed batch read part of the delivery
            records = sum(sample_line_counts().values())
            assert (failed, nothing) == ("failed", 0) and committed == ("committed", records, records)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            cur.execute(f"DROP TABLESPACE IF EXISTS {tablespace}")
        admin.close()


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _records_in(kind: str, delivery: Path) -> int:
    """Records of a delivery, counted from its files: non-blank NDJSON lines, or CSV rows after each header."""
    if kind == "fhir":
        return sum(sample_line_counts().values())
    total = 0
    for path in delivery.glob("*.csv"):
        with path.open(newline="", encoding="utf-8") as handle:
            total += sum(1 for _ in csv.reader(handle)) - 1
    return total


# --- helpers ----------------------------------------------------------------------------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "health_ingest", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def _cli_with_peak(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI and follow the peak resident memory (`VmHWM`) of it and of each of its workers, in MiB: the
    largest. (`ru_maxrss` would not do: on Linux a child started from this process inherits its high-water mark.)"""
    process = _start_cli(*args)
    output: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda: output.__setitem__("out", process.stdout.read())),
        threading.Thread(target=lambda: output.__setitem__("err", process.stderr.read())),
    ]
    for reader in readers:
        reader.start()
    peak_kib = 0
    while process.poll() is None:
        for pid in [process.pid, *_children(process.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        time.sleep(0.01)
    for reader in readers:
        reader.join()
    completed = subprocess.CompletedProcess(process.args, process.returncode, output["out"], output["err"])
    return completed, peak_kib / 1024


def _start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "health_ingest", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


_BATCH_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'health-ingest' "
    "AND datname = current_database() AND pid <> pg_backend_pid()"
)


def _activity(pattern: str) -> str:
    return (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'health-ingest' "
        f"AND datname = current_database() AND state = 'active' AND query LIKE '{pattern}' AND pid <> pg_backend_pid()"
    )


def _wait_for(db, probe: str, process: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll until `probe` counts something, while the process runs."""
    deadline = time.monotonic() + timeout
    with db.cursor() as cur:
        while process.poll() is None and time.monotonic() < deadline:
            cur.execute(probe)
            if cur.fetchone()[0]:
                return True
            time.sleep(0.02)
    return False


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _without_ceiling(source):
    """Planted faults make most of a small file: the quarantine ceiling is lifted to see each one quarantined."""
    from dataclasses import replace

    return replace(source, quality=replace(source.quality, quarantine_ceiling=1.0))
