"""The Bulk Data client against a Bulk Data server on loopback that serves the shipped sample.

Each scenario ends with exact warehouse counts (the server's own counts) and no duplicate.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from bulk_server import BulkDataServer, Scenario
from conftest import SAMPLE, sample_line_counts

pytestmark = pytest.mark.integration

FAST = {"min_poll_seconds": 0.01, "max_retry_after_seconds": 0.05}


def _source(server: BulkDataServer, name: str = "bulk_test", **bulk):
    from health_ingest.sources.bulk.settings import BulkSettings
    from health_ingest.sources.registry import Source

    return Source(name=name, kind="fhir", format="ndjson", bulk=BulkSettings(url=server.base_url, **{**FAST, **bulk}))


def _pull(source, **kwargs):
    from health_ingest.batch.load import pull_and_load

    messages: list[str] = []
    export, result = pull_and_load(source, progress=messages.append, **kwargs)
    return export, result, messages


def _table_counts(db, server: BulkDataServer) -> dict[str, tuple[int, int]]:
    """Per type: (rows in the warehouse, distinct ids); both must equal the server's count."""
    found = {}
    with db.cursor() as cur:
        for resource_type in sample_line_counts():
            cur.execute(f"SELECT count(*), count(DISTINCT id) FROM fhir.{resource_type.lower()}")
            found[resource_type] = cur.fetchone()
    return found


def _expected(server: BulkDataServer) -> dict[str, tuple[int, int]]:
    return {t: (server.count(t), server.count(t)) for t in sample_line_counts()}


def _since(db, source: str):
    with db.cursor() as cur:
        cur.execute("SELECT since, export_status_url FROM ingest.source_state WHERE source = %s", (source,))
        return cur.fetchone()


def test_full_export_loads_every_resource_and_moves_since(db):
    with BulkDataServer(
        SAMPLE, Scenario(polls_before_ready=2, error_file=True, relative_urls=True, page_size=4, gzip=True)
    ) as server:
        source = _source(server)
        export, result, messages = _pull(source)

        assert result.status == "committed" and result.rows_quarantined == 0
        assert _table_counts(db, server) == _expected(server)
        kick_off = server.kickoff_requests[0]
        assert kick_off["params"]["_outputFormat"] == ["application/fhir+ndjson"] and "_since" not in kick_off["params"]
        assert any("(33% complete)" in m for m in messages), "X-Progress is shown"
        since, in_flight = _since(db, source.name)
        assert since == datetime.fromisoformat(export.transaction_time.replace("Z", "+00:00"))
        assert in_flight is None
        assert server.deletes, "the finished export was released with DELETE"
        with db.cursor() as cur:  # the error[] file is recorded by severity and code, not its text
            cur.execute("SELECT severity, code, issues FROM ingest.export_errors")
            assert cur.fetchall() == [("error", "processing", 1)]


def test_incremental_export_brings_only_newer_resources_and_deletions(db):
    with BulkDataServer(SAMPLE, Scenario(polls_before_ready=0)) as server:
        source = _source(
            server,
            types=("Patient", "Encounter", "Procedure"),
            type_filters=("Encounter?status=finished,cancelled",),
            method="post",
        )
        first, _, _ = _pull(source)
        encounters, procedures = server.ids("Encounter"), server.ids("Procedure")
        for encounter_id in encounters[:5]:
            server.update("Encounter", encounter_id, status="cancelled")
        server.delete("Procedure", procedures[0])
        server.delete("Procedure", procedures[1])
        new_procedure = json.loads((SAMPLE / "Procedure.000.ndjson").read_text().splitlines()[5])
        server.add({**new_procedure, "id": "new-procedure-0001"})

        second, result, _ = _pull(source)

        params = server.kickoff_requests[1]["params"]
        assert params["_since"] == [first.transaction_time.replace("+00:00", "Z")] or params["_since"][0].startswith(
            first.transaction_time[:19]
        )
        assert server.kickoff_requests[1]["method"] == "POST" and params["_type"] == ["Patient,Encounter,Procedure"]
        assert params["_typeFilter"] == ["Encounter?status=finished,cancelled"]
        assert result.rows_read == 6, "five updated Encounters and one new Procedure, nothing else"
        with db.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT id) FROM fhir.encounter")
            assert cur.fetchone() == (server.count("Encounter"),) * 2
            cur.execute("SELECT count(*) FROM fhir.encounter WHERE resource->>'status' = 'cancelled'")
            assert cur.fetchone()[0] == 5
            cur.execute("SELECT count(*), count(DISTINCT id) FROM fhir.procedure")
            assert cur.fetchone() == (server.count("Procedure"),) * 2 == (2056 - 2 + 1,) * 2
            cur.execute("SELECT resource_type, found FROM ingest.deletions WHERE batch_id = %s", (result.batch_id,))
            assert cur.fetchall() == [("Procedure", True), ("Procedure", True)]
            cur.execute("SELECT rows_deleted FROM ingest.batches WHERE batch_id = %s", (result.batch_id,))
            assert cur.fetchone()[0] == 2
        assert _since(db, source.name)[0] == datetime.fromisoformat(second.transaction_time.replace("Z", "+00:00"))


def test_a_429_storm_is_waited_out(db):
    with BulkDataServer(SAMPLE, Scenario(throttle_polls=6, retry_after="120")) as server:
        source = _source(server, level="patient")
        started = time.monotonic()
        _, result, messages = _pull(source)

        assert server.kickoff_requests[0]["path"] == "/fhir/Patient/$export"
        assert server.throttled == 6 and result.status == "committed"
        assert sum("throttled (429)" in m for m in messages) == 6
        assert time.monotonic() - started >= 6 * FAST["max_retry_after_seconds"], "each Retry-After honoured (capped)"
        assert _table_counts(db, server) == _expected(server)


def test_a_500_on_one_file_is_retried(db):
    with BulkDataServer(SAMPLE, Scenario(fail_file_once="Encounter")) as server:
        _, result, _ = _pull(_source(server, level="group", group="cohort-12"))

        assert server.kickoff_requests[0]["path"] == "/fhir/Group/cohort-12/$export"
        assert server.file_gets["Encounter-1.ndjson"] == 2 and server.file_gets["Patient-1.ndjson"] == 1
        assert _table_counts(db, server) == _expected(server)
        assert result.rows_loaded == sum(sample_line_counts().values())


def test_an_expired_status_url_starts_a_new_export(db):
    with BulkDataServer(SAMPLE, Scenario(expire_first_export=True)) as server:
        export, _result, messages = _pull(_source(server))

        assert len(server.kickoff_requests) == 2 and export.kick_offs == 2
        assert any("no longer knows this export" in m for m in messages)
        assert _table_counts(db, server) == _expected(server)


def test_smart_backend_services_token_expiring_mid_export_is_renewed(db, monkeypatch):
    from health_ingest.sources.bulk.auth import new_signing_key

    for alg in ("RS384", "ES384"):
        with BulkDataServer(SAMPLE, Scenario(require_auth=True, token_uses=4, polls_before_ready=3)) as server:
            pem, jwks = new_signing_key(alg)
            server.register_client("health-ingest-test", jwks)
            extra = {
                "auth": "smart-backend-services",
                "client_id": "health-ingest-test",
                "alg": alg,
                "kid": jwks["keys"][0]["kid"],
            }
            monkeypatch.setenv(
                "AIRFLOW_CONN_BULK_AUTH", json.dumps({"conn_type": "http", "password": pem.decode(), "extra": extra})
            )
            source = _source(server, name=f"bulk_{alg.lower()}", connection="bulk_auth", parallel_downloads=2)
            _, result, _ = _pull(source)

            issued = len(server.tokens)
            refused = [r for r in server.requests if r[2] == 401]
            assert issued >= 3 and refused, "tokens expired mid-export, were refused, and were renewed"
            assert result.status == "committed"
            assert {t: c[0] for t, c in _table_counts(db, server).items()} == sample_line_counts()


def test_an_unregistered_client_is_refused_with_a_clear_error(db, monkeypatch):
    from health_ingest.errors import ExportError
    from health_ingest.sources.bulk.auth import new_signing_key

    with BulkDataServer(SAMPLE, Scenario(require_auth=True)) as server:
        pem, _ = new_signing_key("RS384")
        monkeypatch.setenv(
            "AIRFLOW_CONN_BULK_AUTH",
            json.dumps(
                {"password": pem.decode(), "extra": {"auth": "smart-backend-services", "client_id": "stranger"}}
            ),
        )
        with pytest.raises(ExportError, match=r"token endpoint .* refused client 'stranger': HTTP 401 invalid_client"):
            _pull(_source(server, connection="bulk_auth"))
        assert pem.decode() not in str(server.requests)


def test_a_crash_between_polling_and_download_resumes_the_same_export(db, monkeypatch):
    from health_ingest.sources.bulk import client as client_module

    with BulkDataServer(SAMPLE) as server:
        source = _source(server)
        original = client_module.BulkClient.download_all

        def crash(self, manifest, folder):
            raise KeyboardInterrupt("worker killed")

        monkeypatch.setattr(client_module.BulkClient, "download_all", crash)
        with pytest.raises(KeyboardInterrupt):
            _pull(source)
        assert _since(db, source.name) == (None, f"{server.base_url}/status/{next(iter(server.jobs))}")

        monkeypatch.setattr(client_module.BulkClient, "download_all", original)
        export, _result, messages = _pull(source)

        assert len(server.kickoff_requests) == 1 and export.resumed, "the export in flight was polled, not restarted"
        assert any(m.startswith("resuming the export") for m in messages)
        assert _table_counts(db, server) == _expected(server)
        with db.cursor() as cur:
            cur.execute("SELECT count(*) FROM ingest.batches WHERE status = 'committed'")
            assert cur.fetchone()[0] == 1


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        (
            Scenario(html_kickoff=True),
            r"source bulk_test: kick-off http://127\.0\.0\.1:\d+/fhir/\$export\?.* answered "
            r"HTTP 200 \(text/html; charset=utf-8\) .* an HTML page",
        ),
        (
            Scenario(wrong_count="Condition"),
            r"source bulk_test: file Condition\.000\.ndjson \(.*/Condition-1\.ndjson\):"
            r" the manifest announces 556 resources, the download holds 555",
        ),
        (Scenario(truncate_gzip="Encounter"), r"source bulk_test: file Encounter\.000\.ndjson \(.*\): truncated gzip"),
        (
            Scenario(wrong_type_line="Device"),
            r"source bulk_test: file Device\.000\.ndjson \(.*\) line 2: a Patient "
            r"resource in a file the manifest lists as Device",
        ),
    ],
    ids=["html", "count-mismatch", "truncated-gzip", "wrong-type-line"],
)
def test_bad_exports_fail_clearly_and_commit_nothing(db, scenario, message):
    from health_ingest.errors import ExportError

    with BulkDataServer(SAMPLE, scenario) as server, pytest.raises(ExportError, match=message):
        _pull(_source(server))
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM ingest.batches")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'fhir'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT since FROM ingest.source_state")
        assert all(row[0] is None for row in cur.fetchall()), "_since did not move"


def test_retry_after_is_read_as_seconds_or_a_date_and_capped():
    from health_ingest.sources.bulk.client import backoff_seconds, retry_after_seconds

    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("7", cap=600) == 7
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=90), usegmt=True), cap=600, now=now) == 90
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=90), usegmt=True), cap=600, now=now) == 0
    assert retry_after_seconds("86400000", cap=600) == 600
    assert retry_after_seconds("soon", cap=600) is None
    assert retry_after_seconds("nan", cap=600) is None
    waits = [backoff_seconds(attempt, base=1, cap=30) for attempt in range(10) for _ in range(20)]
    assert min(waits) >= 0.5 and max(waits) <= 30
    assert len({round(w, 6) for w in waits}) > 150, "jittered"


def test_keys_jwks_prints_a_public_key_set_and_keeps_the_private_key(tmp_path, capsys):
    from health_ingest.cli import main

    out = tmp_path / "client.pem"
    assert main(["keys", "jwks", "--alg", "ES384", "--out", str(out)]) == 0
    jwks = json.loads(capsys.readouterr().out)
    key = jwks["keys"][0]
    assert key["kty"] == "EC" and key["crv"] == "P-384" and key["alg"] == "ES384" and "d" not in key
    assert out.read_text().startswith("-----BEGIN PRIVATE KEY-----") and oct(out.stat().st_mode)[-3:] == "600"


def test_the_dag_of_a_bulk_source_pulls_incrementally_and_on_demand_in_full(airflow_db, db, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from conftest import PROJECT

    with BulkDataServer(SAMPLE, Scenario(polls_before_ready=1)) as server:
        sources = tmp_path / "sources.yml"
        sources.write_text(
            "sources:\n  - name: hospital_test\n    kind: fhir\n    schedule: '0 1 * * *'\n    bulk:\n"
            f"      url: {server.base_url}\n      types: [Patient, Procedure]\n"
            "      min_poll_seconds: 0.01\n      max_retry_after_seconds: 0.05\n"
        )
        monkeypatch.setenv("HEALTH_INGEST_SOURCES", str(sources))
        dag = DagBag(dag_folder=str(PROJECT / "dags")).dags["fhir_hospital_test"]

        assert dag.test().state == "success"
        server.delete("Procedure", server.ids("Procedure")[0])
        assert dag.test().state == "success"
        assert dag.test(run_conf={"full_refresh": True}).state == "success"

        since = [request["params"].get("_since") for request in server.kickoff_requests]
        assert since[0] is None and since[1] is not None and since[2] is None, "full, incremental, full"
        polls = [path for method, path, _ in server.requests if method == "GET" and "/status/" in path]
        # the task deferred: the triggerer polled until ready (202, 200), then the resumed task read the manifest
        assert len(polls) == 3 * 3 and all(polls.count(path) == 3 for path in polls)
        with db.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT id) FROM fhir.procedure")
            assert cur.fetchone() == (2055, 2055)
            cur.execute(
                "SELECT rows_read, rows_deleted FROM ingest.batches WHERE status = 'committed' ORDER BY commit_seq"
            )
            assert cur.fetchall() == [(13 + 2056, 0), (0, 1), (13 + 2055, 0)]


def test_the_cli_pulls_a_declared_source_and_downloads_a_one_off_export(db, tmp_path, monkeypatch, capsys):
    from health_ingest.cli import main

    with BulkDataServer(SAMPLE, Scenario(polls_before_ready=1, retry_after="0", gzip=True)) as server:
        sources = tmp_path / "sources.yml"
        sources.write_text(
            "sources:\n  - name: hospital_cli\n    kind: fhir\n    bulk:\n"
            f"      url: {server.base_url}\n      min_poll_seconds: 0.01\n"
        )
        monkeypatch.setenv("HEALTH_INGEST_SOURCES", str(sources))
        assert main(["pull", "fhir", "--source", "hospital_cli"]) == 0
        shown = capsys.readouterr()
        assert "export kicked off (full)" in shown.err and "export in progress (50% complete)" in shown.err
        assert "committed" in shown.out and "next export of hospital_cli since" in shown.out

        one_off = tmp_path / "one-off"
        assert main(["pull", "fhir", "--url", server.base_url, "--out", str(one_off)]) == 0
        assert "not loaded" in capsys.readouterr().out
        downloaded: dict[str, int] = {}
        for path in one_off.iterdir():  # the server splits its files at 1,000 records
            resource_type = path.name.split(".")[0]
            downloaded[resource_type] = downloaded.get(resource_type, 0) + sum(1 for _ in path.open())
    assert downloaded == sample_line_counts()
    with db.cursor() as cur:
        cur.execute("SELECT count(*), sum(rows_loaded) FROM ingest.batches WHERE status = 'committed'")
        assert cur.fetchone() == (1, sum(sample_line_counts().values())), "the one-off loaded nothing"


def test_an_export_past_its_deadline_stays_recorded_and_can_be_cancelled(db):
    from health_ingest.errors import ExportError
    from health_ingest.sources.bulk.pull import cancel_export

    with BulkDataServer(SAMPLE, Scenario(polls_before_ready=1000, retry_after="1")) as server:
        source = _source(server, deadline_minutes=0.002)
        with pytest.raises(ExportError, match="did not finish before its deadline"):
            _pull(source)
        job = next(iter(server.jobs))
        assert _since(db, source.name) == (None, f"{server.base_url}/status/{job}"), "kept for the next run"

        assert "export cancelled (DELETE answered 202)" in cancel_export(source)
        assert server.deletes == [job] and _since(db, source.name) == (None, None)


def test_a_static_bearer_token_is_sent_with_every_request(db, monkeypatch):
    with BulkDataServer(SAMPLE, Scenario(require_auth=True)) as server:
        server.tokens["static-token-of-the-test"] = [float("inf"), None]
        monkeypatch.setenv(
            "AIRFLOW_CONN_BULK_BEARER",
            json.dumps({"password": "static-token-of-the-test", "extra": {"auth": "bearer"}}),
        )
        _, result, messages = _pull(_source(server, connection="bulk_bearer"))

        assert result.status == "committed" and not [r for r in server.requests if r[2] == 401]
        assert "static-token-of-the-test" not in " ".join(messages)


def test_a_file_changed_between_download_and_load_fails_the_batch_and_is_downloaded_again(db):
    from health_ingest.batch.load import load_delivery
    from health_ingest.errors import LoadError
    from health_ingest.sources.bulk.pull import pull_export

    with BulkDataServer(SAMPLE) as server:
        source = _source(server)
        export = pull_export(source)
        device = export.delivery / "Device.000.ndjson"
        device.write_bytes(b" " + device.read_bytes())  # the same resources, other bytes
        with pytest.raises(LoadError, match=r"file Device\.000\.ndjson: what was loaded is not what was downloaded"):
            load_delivery(source, export.delivery)
        with db.cursor() as cur:
            cur.execute("SELECT status FROM ingest.batches")
            assert cur.fetchall() == [("failed",)]
            cur.execute("SELECT since FROM ingest.source_state")
            assert cur.fetchall() == [(None,)], "_since did not move"

        _, result, messages = _pull(source)

        assert "the downloaded export changed on disk since: downloading it again" in messages
        assert len(server.kickoff_requests) == 1 and server.file_gets["Device-1.ndjson"] == 2
        assert result.status == "committed" and _table_counts(db, server) == _expected(server)
