"""A FHIR Bulk Data Access server for the tests, on loopback, serving the shipped sample.

Written against the HL7 Bulk Data Access IG (kick-off at system, Patient and Group level, GET and POST, `_type`,
`_since`, `_outputFormat`; status polling with `Retry-After` and `X-Progress`; manifests with `output`, `deleted`,
`error` and paged `link`s; DELETE on the status URL) and SMART Backend Services (a registered client's JWKS, signed
client assertions checked with PyJWT, expiring tokens). A `Scenario` makes it misbehave the way real servers do.
"""

from __future__ import annotations

import gzip
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


@dataclass
class Scenario:
    polls_before_ready: int = 1
    retry_after: str = "1"
    throttle_polls: int = 0  # this many 429 answers to status polls before any other answer
    fail_file_once: str | None = None  # the first download of this resource type's file answers 500
    expire_first_export: bool = False  # the first export's status URL answers 410 Gone
    require_auth: bool = False
    token_lifetime: int = 300
    token_uses: int | None = None  # a token is refused (401) after this many uses
    gzip: bool = False  # files sent with Content-Encoding: gzip
    relative_urls: bool = False
    page_size: int | None = None  # manifest entries per page (paged with link next)
    file_lines: int = 1000
    error_file: bool = False
    html_kickoff: bool = False
    wrong_count: str | None = None  # the manifest's count for this type is one too many
    truncate_gzip: str | None = None  # this type's file is cut in the middle of its gzip stream
    wrong_type_line: str | None = None  # this type's file gets one Patient line


@dataclass
class Job:
    job_id: str
    transaction_time: str
    files: dict[str, bytes]
    counts: dict[str, int]
    types: dict[str, str]
    kinds: dict[str, str]
    request: str
    polls: int = 0
    expired: bool = False


@dataclass
class Client:
    client_id: str
    jwks: dict
    seen_jti: set[str] = field(default_factory=set)


class BulkDataServer:
    def __init__(self, sample: Path, scenario: Scenario | None = None) -> None:
        self.scenario = scenario or Scenario()
        self.resources: dict[tuple[str, str], tuple[dict, datetime]] = {}
        self.deleted: list[tuple[str, str, datetime]] = []
        epoch = datetime.now(UTC) - timedelta(days=1)
        for path in sorted(sample.glob("*.000.ndjson")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    resource = json.loads(line)
                    self.resources[(resource["resourceType"], resource["id"])] = (resource, epoch)
        self.jobs: dict[str, Job] = {}
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, list] = {}  # token -> [expires_at, uses_left]
        self.requests: list[tuple[str, str, int]] = []
        self.kickoff_requests: list[dict] = []
        self.file_gets: dict[str, int] = {}
        self.throttled = 0
        self.deletes: list[str] = []
        self.lock = threading.Lock()
        self._clock = epoch
        self.httpd = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # --- control from the tests -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/auth/token"

    def __enter__(self) -> BulkDataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def register_client(self, client_id: str, jwks: dict) -> None:
        self.clients[client_id] = Client(client_id, jwks)

    def update(self, resource_type: str, resource_id: str, **changes) -> None:
        resource, _ = self.resources[(resource_type, resource_id)]
        self.resources[(resource_type, resource_id)] = ({**resource, **changes}, self._now())

    def add(self, resource: dict) -> None:
        self.resources[(resource["resourceType"], resource["id"])] = (resource, self._now())

    def delete(self, resource_type: str, resource_id: str) -> None:
        del self.resources[(resource_type, resource_id)]
        self.deleted.append((resource_type, resource_id, self._now()))

    def count(self, resource_type: str) -> int:
        return sum(1 for t, _ in self.resources if t == resource_type)

    def ids(self, resource_type: str) -> list[str]:
        return sorted(i for t, i in self.resources if t == resource_type)

    def _now(self) -> datetime:
        """Strictly increasing, so that a change made after an export is always newer than its transactionTime."""
        with self.lock:
            self._clock = max(datetime.now(UTC), self._clock + timedelta(milliseconds=1))
            return self._clock

    # --- the export ---------------------------------------------------------------------------

    def start_export(self, params: dict[str, list[str]], request: str) -> Job:
        since = params.get("_since", [None])[0]
        since_at = datetime.fromisoformat(since.replace("Z", "+00:00")) if since else None
        types = set(",".join(params.get("_type", [])).split(",")) - {""}
        transaction_time = self._now()
        lines: dict[str, list[bytes]] = {}
        for (resource_type, _), (resource, updated) in sorted(self.resources.items()):
            if (types and resource_type not in types) or (since_at and updated <= since_at):
                continue
            served = {**resource, "meta": {**resource.get("meta", {}), "lastUpdated": updated.isoformat()}}
            lines.setdefault(resource_type, []).append(json.dumps(served).encode())
        job = Job(secrets.token_hex(6), transaction_time.isoformat().replace("+00:00", "Z"), {}, {}, {}, {}, request)
        for resource_type, type_lines in sorted(lines.items()):
            if resource_type == self.scenario.wrong_type_line:
                type_lines = [*type_lines[:1], json.dumps({"resourceType": "Patient", "id": "x"}).encode()]
                type_lines += lines[resource_type][1:]
            for part, start in enumerate(range(0, len(type_lines), self.scenario.file_lines)):
                name = f"{resource_type}-{part + 1}.ndjson"
                chunk = type_lines[start : start + self.scenario.file_lines]
                job.files[name] = b"\n".join(chunk) + b"\n"
                job.counts[name] = len(chunk) + (1 if resource_type == self.scenario.wrong_count else 0)
                job.types[name], job.kinds[name] = resource_type, "output"
        gone = [(t, i) for t, i, when in self.deleted if since_at and when > since_at and (not types or t in types)]
        if gone:
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"request": {"method": "DELETE", "url": f"{t}/{i}"}} for t, i in gone],
            }
            job.files["deleted.ndjson"] = json.dumps(bundle).encode() + b"\n"
            job.counts["deleted.ndjson"], job.types["deleted.ndjson"] = 1, "Bundle"
            job.kinds["deleted.ndjson"] = "deleted"
        if self.scenario.error_file:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "processing", "diagnostics": "could not export Media/1"}],
            }
            job.files["errors.ndjson"] = json.dumps(outcome).encode() + b"\n"
            job.counts["errors.ndjson"], job.types["errors.ndjson"] = 1, "OperationOutcome"
            job.kinds["errors.ndjson"] = "error"
        if self.scenario.expire_first_export and not self.jobs:
            job.expired = True
        self.jobs[job.job_id] = job
        return job

    def manifest_pages(self, job: Job) -> list[dict]:
        entries = []
        for name in job.files:
            url = (
                f"files/{job.job_id}/{name}"
                if self.scenario.relative_urls
                else f"{self.base_url}/files/{job.job_id}/{name}"
            )
            entry = {"type": job.types[name], "url": url}
            if job.kinds[name] == "output":
                entry["count"] = job.counts[name]
            entries.append((job.kinds[name], entry))
        size = self.scenario.page_size or max(1, len(entries))
        chunks = [entries[i : i + size] for i in range(0, len(entries), size)] or [[]]
        pages = []
        for number, chunk in enumerate(chunks, start=1):
            page = {
                "transactionTime": job.transaction_time,
                "request": job.request,
                "requiresAccessToken": self.scenario.require_auth,
                "output": [e for k, e in chunk if k == "output"],
                "deleted": [e for k, e in chunk if k == "deleted"],
                "error": [e for k, e in chunk if k == "error"],
            }
            if number < len(chunks):
                page["link"] = [{"relation": "next", "url": f"{self.base_url}/status/{job.job_id}?page={number + 1}"}]
            pages.append(page)
        return pages

    # --- SMART Backend Services ---------------------------------------------------------------

    def issue_token(self, form: dict[str, list[str]]) -> tuple[int, dict]:
        import jwt

        assertion = form.get("client_assertion", [""])[0]
        if form.get("grant_type") != ["client_credentials"] or not assertion:
            return 400, {"error": "invalid_request"}
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
            client = self.clients[claims["iss"]]
            key = next(k for k in client.jwks["keys"] if k["kid"] == header.get("kid"))
            jwt.decode(
                assertion,
                jwt.PyJWK(key).key,
                algorithms=["RS384", "ES384"],
                audience=self.token_url,
                issuer=client.client_id,
                options={"require": ["exp", "jti", "sub"]},
            )
            if claims["sub"] != client.client_id or claims["jti"] in client.seen_jti:
                raise ValueError("replayed or foreign assertion")
            client.seen_jti.add(claims["jti"])
        except (KeyError, StopIteration, ValueError, jwt.PyJWTError):
            return 401, {"error": "invalid_client"}
        token = secrets.token_urlsafe(24)
        self.tokens[token] = [time.time() + self.scenario.token_lifetime, self.scenario.token_uses]
        return 200, {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.scenario.token_lifetime,
            "scope": form.get("scope", [""])[0],
        }

    def authorised(self, header: str | None) -> bool:
        if not self.scenario.require_auth:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        with self.lock:
            state = self.tokens.get(header[7:])
            if state is None or state[0] < time.time() or state[1] == 0:
                return False
            if state[1] is not None:
                state[1] -= 1
        return True


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients that drop a kept-alive connection are not the test's business."""


def _outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def _handler(server: BulkDataServer):
    scenario = server.scenario

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            path = url.path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = self._dispatch(method, path, parse_qs(url.query), body)
            server.requests.append((method, path, status))

        def _dispatch(self, method: str, path: str, query: dict, body: bytes) -> int:
            if path == "/fhir/.well-known/smart-configuration":
                return self._json(
                    200,
                    {
                        "token_endpoint": server.token_url,
                        "grant_types_supported": ["client_credentials"],
                        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                    },
                )
            if path == "/auth/token" and method == "POST":
                status, answer = server.issue_token(parse_qs(body.decode()))
                return self._json(status, answer)
            if not server.authorised(self.headers.get("Authorization")):
                self.extra_headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
                return self._json(401, _outcome("login", "access token missing, expired or revoked"))
            if path.endswith("/$export"):
                return self._kick_off(method, path, query, body)
            if path.startswith("/fhir/status/"):
                return self._status(method, path.rsplit("/", 1)[1], query)
            if path.startswith("/fhir/files/"):
                _, _, _, job_id, name = path.split("/", 4)
                return self._file(job_id, name)
            return self._json(404, _outcome("not-found", "no such endpoint"))

        def _kick_off(self, method: str, path: str, query: dict, body: bytes) -> int:
            if scenario.html_kickoff:
                return self._send(
                    200,
                    b"<html><head><title>Sign in</title></head><body>Portal</body></html>",
                    "text/html; charset=utf-8",
                )
            if self.headers.get("Prefer") != "respond-async" or "fhir+json" not in (self.headers.get("Accept") or ""):
                return self._json(400, _outcome("invalid", "Prefer: respond-async and Accept are required"))
            params = {k: list(v) for k, v in query.items()}
            if method == "POST":
                for parameter in json.loads(body)["parameter"]:
                    value = next(v for k, v in parameter.items() if k.startswith("value"))
                    params.setdefault(parameter["name"], []).append(value)
            if params.get("_outputFormat", ["application/fhir+ndjson"])[0] not in {
                "application/fhir+ndjson",
                "application/ndjson",
                "ndjson",
            }:
                return self._json(400, _outcome("not-supported", "unsupported _outputFormat"))
            server.kickoff_requests.append({"method": method, "path": path, "params": params})
            job = server.start_export(params, f"{server.base_url}{path}")
            location = (
                f"/fhir/status/{job.job_id}" if scenario.relative_urls else f"{server.base_url}/status/{job.job_id}"
            )
            self.extra_headers = {"Content-Location": location}
            return self._send(202, b"", None)

        def _status(self, method: str, job_id: str, query: dict) -> int:
            job = server.jobs.get(job_id)
            if method == "DELETE":
                server.deletes.append(job_id)
                server.jobs.pop(job_id, None)
                return self._send(202 if job else 404, b"", None)
            if job is None or job.expired:
                return self._json(410 if job else 404, _outcome("not-found", "export expired"))
            if server.throttled < scenario.throttle_polls:
                server.throttled += 1
                self.extra_headers = {"Retry-After": scenario.retry_after}
                return self._json(429, _outcome("throttled", "too many requests"))
            job.polls += 1
            if job.polls <= scenario.polls_before_ready:
                self.extra_headers = {
                    "Retry-After": scenario.retry_after,
                    "X-Progress": f"{100 * job.polls // (scenario.polls_before_ready + 1)}% complete",
                }
                return self._send(202, b"", None)
            page = int(query.get("page", ["1"])[0])
            expires = datetime.now(UTC) + timedelta(hours=1)
            self.extra_headers = {"Expires": expires.strftime("%a, %d %b %Y %H:%M:%S GMT")}
            return self._json(200, server.manifest_pages(job)[page - 1])

        def _file(self, job_id: str, name: str) -> int:
            job = server.jobs.get(job_id)
            if job is None or name not in job.files:
                return self._json(404, _outcome("not-found", "no such file"))
            if scenario.require_auth and not self.headers.get("Authorization"):
                return self._json(401, _outcome("login", "requiresAccessToken"))
            attempts = server.file_gets[name] = server.file_gets.get(name, 0) + 1
            resource_type = job.types[name]
            if resource_type == scenario.fail_file_once and attempts == 1:
                return self._json(500, _outcome("exception", "disk hiccup"))
            data = job.files[name]
            if resource_type == scenario.truncate_gzip:
                compressed = gzip.compress(data)
                self.extra_headers = {"Content-Encoding": "gzip"}
                return self._send(200, compressed[: len(compressed) // 2], "application/fhir+ndjson")
            if scenario.gzip and "gzip" in (self.headers.get("Accept-Encoding") or ""):
                self.extra_headers = {"Content-Encoding": "gzip"}
                data = gzip.compress(data)
            return self._send(200, data, "application/fhir+ndjson")

        def _json(self, status: int, document: dict) -> int:
            content_type = "application/fhir+json" if "resourceType" in document else "application/json"
            return self._send(status, json.dumps(document).encode(), content_type)

        def _send(self, status: int, data: bytes, content_type: str | None) -> int:
            self.send_response(status)
            for name, value in getattr(self, "extra_headers", {}).items():
                self.send_header(name, value)
            self.extra_headers = {}
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return status

    return Handler
