"""The Ingestion view as a data engineer meets it: the real Airflow API server with the plugin, a real warehouse
holding committed, rejected and failed batches, and Debian's chromium driven through the Airflow UI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import PROJECT
from health_ingest.batch.fhir import run_fhir_batch
from health_ingest.errors import BatchRejected, LoadError
from health_ingest.sources.registry import Source

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = PROJECT / ".state" / "artefacts" / "ingestion-view"
PASSWORDS = {"viewer": "viewer-password", "outsider": "outsider-password"}
PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1980-04-02"}
OBSERVATION = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "subject": {"reference": "Patient/p1"},
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    "effectiveDateTime": "2020-05-05T00:00:00Z",
}
SOURCES_FILE = """
sources:
  - {name: smart_sample, kind: fhir, format: ndjson, schedule: "0 2 * * *", expect_every: 26h, owner: data-eng}
  - {name: hospital_b, kind: fhir, format: ndjson, schedule: "0 3 * * *", expect_every: 26h, owner: ward-team}
  - {name: regional_claims, kind: claims, format: snds, schedule: "0 3 * * 1", expect_every: 8d, owner: claims-team}
"""


@pytest.fixture
def warehouse_batches(tmp_path, warehouse_url, smart_source):
    """Real batches: smart_sample commits one with a quarantined line; hospital_b fails one (a delivery without
    NDJSON) and then has one rejected (an observation before the patient's birth); regional_claims has none."""
    committed = _deliver(tmp_path / "good", {"Patient": [PATIENT], "Observation": [OBSERVATION]}, bad_line=True)
    run_fhir_batch(committed, smart_source)
    hospital_b = Source(name="hospital_b", kind="fhir", format="ndjson", id_space="hospital_b")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("not an export")
    with pytest.raises(LoadError):
        run_fhir_batch(empty, hospital_b)
    before_birth = {**OBSERVATION, "effectiveDateTime": "1970-05-05T00:00:00Z"}
    rejected = _deliver(tmp_path / "bad", {"Patient": [PATIENT], "Observation": [before_birth]})
    with pytest.raises(BatchRejected):
        run_fhir_batch(rejected, hospital_b)
    return warehouse_url


@pytest.fixture
def api_server(tmp_path, warehouse_batches, airflow_db):
    """`airflow api-server` on a free port, with the simple auth manager's viewer and a user without a role."""
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    sources = tmp_path / "sources.yml"
    sources.write_text(SOURCES_FILE)
    port = _free_port()
    env = {
        **os.environ,
        "HEALTH_INGEST_WAREHOUSE_URL": warehouse_batches,
        "HEALTH_INGEST_SOURCES": str(sources),
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "viewer:viewer,outsider:",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": "ingestion-view-test-secret-0123456789abcdef",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    }
    log = (tmp_path / "api-server.log").open("w")
    airflow = str(Path(sys.executable).with_name("airflow"))
    server = subprocess.Popen(
        [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, server, tmp_path / "api-server.log")
        yield base
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


def test_a_data_engineer_finds_the_rejected_batch_its_failed_expectation_and_its_data_docs(api_server):
    from playwright.sync_api import expect, sync_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
                "--no-first-run",
            ],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        outside = []
        page.on(
            "request",
            lambda r: (
                r.url.startswith(("http:", "https:", "ws:", "wss:"))
                and not r.url.startswith(api_server)
                and outside.append(r.url)
            ),
        )
        page.goto(api_server + "/")
        page.get_by_label("Username").fill("viewer")
        page.get_by_label("Password").fill(PASSWORDS["viewer"])
        page.get_by_role("button", name="Sign in").click()

        page.get_by_role("link", name="Ingestion").click()
        frame = page.frame_locator("iframe")
        sources = frame.locator("table#sources")
        expect(sources).to_be_visible(timeout=30_000)
        freshness = {
            name: frame.locator(f'tr[data-source="{name}"] .fresh').inner_text()
            for name in ("smart_sample", "hospital_b", "regional_claims")
        }
        assert freshness == {"smart_sample": "fresh", "hospital_b": "late", "regional_claims": "quiet"}
        expect(frame.locator("svg.chart")).to_have_count(3)
        page.screenshot(path=str(ARTEFACTS / "overview.png"), full_page=True)

        frame.locator('tr[data-source="hospital_b"] td').nth(5).get_by_role("link").click()
        expect(frame.locator("h1")).to_contain_text("Batch")
        expect(frame.locator(".facts .status")).to_have_text("rejected")
        expect(frame.locator("#reason")).to_contain_text("expect_column_values_to_be_between(years_after_birth)")
        failed_row = frame.locator("table.quality tr.failed").first
        expect(failed_row).to_contain_text("expect_column_values_to_be_between(years_after_birth)")
        expect(failed_row).to_contain_text("1 of 1 values unexpected")
        expect(frame.locator("table.quality").first).to_have_attribute("data-category", "plausibility")
        batch_url = next(f.url for f in page.frames if f.url.startswith(api_server + "/ingestion/batches/"))
        page.screenshot(path=str(ARTEFACTS / "batch-in-airflow.png"), full_page=True)

        frame.get_by_role("link", name="quality results of this batch").click()
        index = frame.locator("#docs-index")
        expect(index).to_contain_text("fhir.observation")
        expect(index.locator("tr.failed")).to_contain_text("years_after_birth")
        expect(frame.locator("dl.facts")).to_contain_text("batch-")
        assert "$PARAMETER" not in frame.locator("main").inner_text()
        page.screenshot(path=str(ARTEFACTS / "data-docs.png"), full_page=True)
        whole = context.new_page()  # the batch page on its own (the session's cookie), at its full height
        whole.goto(batch_url)
        expect(whole.locator("table.quality tr.failed").first).to_be_visible()
        whole.screenshot(path=str(ARTEFACTS / "batch.png"), full_page=True)
        browser.close()
    assert outside == [], "the view asks nothing of the network"
    print(f"\nscreenshots of the Ingestion view: {ARTEFACTS}")


def test_every_plugin_route_refuses_anonymous_requests_and_users_without_access(api_server):
    from health_ingest.airflow.ui.app import create_app

    viewer = _token(api_server, "viewer")
    outsider = _token(api_server, "outsider")
    with urllib.request.urlopen(_request(api_server + "/ingestion/api/batches?limit=1", viewer)) as response:
        batch_id = json.load(response)[0]["batch_id"]
    routes = [r.path for r in create_app().routes]
    assert len(routes) >= 10
    paths = [p.replace("{batch_id}", batch_id).replace("{name}", "ingestion.css") for p in routes]
    for path in paths:
        url = api_server + "/ingestion" + path
        assert _status(url, None) in {401, 403}, path
        assert _status(url, outsider) == 403, path
        assert _status(url, viewer) == 200, path
        assert _status(url, "not-a-token") in {401, 403}, path


# --- helpers -----------------------------------------------------------------------------------------------------


def _deliver(folder: Path, resources: dict[str, list[dict]], *, bad_line: bool = False) -> Path:
    folder.mkdir(parents=True)
    for resource_type, items in resources.items():
        lines = "".join(json.dumps(r) + "\n" for r in items)
        if bad_line and resource_type == "Observation":
            lines += '{"resourceType": "Observation", "id": \n'
        (folder / f"{resource_type}.ndjson").write_text(lines)
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(base: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError("the API server stopped:\n" + log.read_text()[-4000:])
        try:
            with urllib.request.urlopen(base + "/api/v2/monitor/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError("the API server did not answer in 120 s:\n" + log.read_text()[-4000:])


def _token(base: str, user: str) -> str:
    body = json.dumps({"username": user, "password": PASSWORDS[user]}).encode()
    request = urllib.request.Request(
        base + "/auth/token", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)["access_token"]


def _request(url: str, token: str | None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})


def _status(url: str, token: str | None) -> int:
    try:
        with urllib.request.urlopen(_request(url, token)) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
