"""The HTTP side of a Bulk Data export: kick-off, status polling, manifest pages, streamed downloads.

Written against the HL7 Bulk Data Access IG, and lenient where servers commonly differ: a relative
`Content-Location` or file URL, `Retry-After` in seconds or as an HTTP date (or absurd), polling without any
`Retry-After`, `X-Progress` or not, 429 anywhere, `requiresAccessToken` missing, `count` missing, files named
anyhow, gzip as a transfer encoding or as the file itself, OperationOutcomes as bare resources or in Bundles.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlencode, urljoin

import orjson

from health_ingest.errors import ExportError, ExportExpired
from health_ingest.sources.bulk.auth import Authoriser
from health_ingest.sources.bulk.settings import BulkSettings

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
CHUNK = 1 << 20
RETRYABLE_ISSUE_CODES = {"transient", "throttled", "timeout", "lock-error", "incomplete"}
FHIR_JSON = "application/fhir+json"
REFERENCE_LIKE = re.compile(r"\b([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}")
LONG_NUMBER = re.compile(r"\d{6,}")


@dataclass(frozen=True)
class ManifestFile:
    kind: str  # output | deleted | error
    type: str
    url: str
    count: int | None


@dataclass(frozen=True)
class Manifest:
    transaction_time: str
    request: str
    requires_access_token: bool
    files: list[ManifestFile]
    expires_at: datetime | None = None

    def of_kind(self, kind: str) -> list[ManifestFile]:
        return [f for f in self.files if f.kind == kind]


@dataclass(frozen=True)
class DownloadedFile:
    name: str
    kind: str
    type: str
    lines: int
    bytes: int
    sha256: str


def retry_after_seconds(value: str | None, *, cap: float, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: a number or an HTTP date, capped; None when it makes no sense."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap)


def backoff_seconds(attempt: int, *, base: float, cap: float) -> float:
    """Exponential backoff with full jitter over its upper half, so that many clients do not poll in step."""
    ceiling = min(cap, max(base, 0.001) * (2 ** min(attempt, 30)))
    return random.uniform(ceiling / 2, ceiling)


class BulkClient:
    """One source's conversation with its server. Every message names the source and the URL or file."""

    def __init__(
        self,
        source: str,
        settings: BulkSettings,
        authoriser: Authoriser,
        session,
        *,
        progress: Progress | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.settings = settings
        self.auth = authoriser
        self.session = session
        self.progress = progress or (lambda message: log.info("source %s: %s", source, message))
        self.sleep = sleep

    # --- kick-off -----------------------------------------------------------------------------

    def kick_off(self, since: str | None) -> tuple[str, str]:
        """Start an export; returns (status URL, the request as sent, without credentials)."""
        settings = self.settings
        params: list[tuple[str, str]] = [("_outputFormat", settings.output_format)]
        if settings.types:
            params.append(("_type", ",".join(settings.types)))
        if since:
            params.append(("_since", since))
        params.extend(("_typeFilter", type_filter) for type_filter in settings.type_filters)
        headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
        if settings.method == "post":
            body = {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": name, ("valueInstant" if name == "_since" else "valueString"): value}
                    for name, value in params
                ],
            }
            request = settings.export_url
            response = self._send(
                "POST",
                request,
                what="kick-off",
                headers={**headers, "Content-Type": FHIR_JSON},
                data=orjson.dumps(body),
            )
        else:
            request = f"{settings.export_url}?{urlencode(params)}"
            response = self._send("GET", request, what="kick-off", headers=headers)
        if response.status_code != 202:
            raise ExportError(self._unexpected(response, "kick-off", request, "202 Accepted"))
        location = response.headers.get("Content-Location") or response.headers.get("Location")
        if not location:
            raise ExportError(f"source {self.source}: kick-off {request} answered 202 without Content-Location")
        status_url = urljoin(request, location)
        self.progress(f"export kicked off ({'since ' + since if since else 'full'}), status at {status_url}")
        return status_url, request

    # --- polling ------------------------------------------------------------------------------

    def wait_for_manifest(self, status_url: str, *, deadline: float) -> Manifest:
        """Poll until the manifest is ready (then read all its pages), the export expires or the deadline passes."""
        attempt = 0
        while True:
            ready, wait = self._poll(status_url, attempt, deadline)
            if ready is not None:
                return self._read_manifest(ready, status_url, deadline)
            attempt += 1
            self._sleep_before(deadline, wait, f"status {status_url}")

    def status_wait(self, status_url: str, attempt: int = 0) -> float | None:
        """One poll: None when the manifest is ready, else the seconds to wait before the next poll."""
        ready, wait = self._poll(status_url, attempt, None)
        return None if ready is not None else wait

    def _poll(self, status_url: str, attempt: int, deadline: float | None):
        """One GET of the status URL: (the 200 response, 0) when the manifest is ready, else (None, seconds to wait:
        the server's Retry-After, or a backoff). Raises ExportExpired when the server no longer knows the export."""
        response = self._send(
            "GET", status_url, what="status", headers={"Accept": "application/json"}, deadline=deadline
        )
        if response.status_code == 200:
            return response, 0.0
        if response.status_code in (404, 410):
            raise ExportExpired(
                f"source {self.source}: status {status_url} answered {response.status_code}: "
                "the server no longer knows this export"
            )
        if response.status_code != 202:
            raise ExportError(self._unexpected(response, "status", status_url, "202 or 200"))
        wait = retry_after_seconds(response.headers.get("Retry-After"), cap=self.settings.max_retry_after_seconds)
        if wait is None:
            wait = backoff_seconds(attempt, base=self.settings.min_poll_seconds, cap=60.0)
        wait = max(wait, self.settings.min_poll_seconds)
        progress = response.headers.get("X-Progress")
        self.progress(f"export in progress{' (' + progress[:80] + ')' if progress else ''}, next poll in {wait:.1f} s")
        return None, wait

    def _read_manifest(self, response, status_url: str, deadline: float) -> Manifest:
        body = self._json(response, "manifest", status_url)
        expires = _expires(response.headers.get("Expires"))
        try:
            transaction_time = str(body["transactionTime"])
            request = str(body.get("request", ""))
            requires_token = bool(body.get("requiresAccessToken", self.auth.required))
        except (KeyError, TypeError):
            raise ExportError(f"source {self.source}: the manifest at {status_url} has no transactionTime") from None
        files: list[ManifestFile] = []
        page, page_url = body, status_url
        pages = 1
        while True:
            for kind in ("output", "deleted", "error"):
                entries = page.get(kind) or []
                if not isinstance(entries, list):
                    raise ExportError(f"source {self.source}: manifest {page_url}: '{kind}' is not a list")
                for entry in entries:
                    files.append(self._manifest_file(kind, entry, page_url))
            next_url = next(
                (link.get("url") for link in page.get("link") or [] if link.get("relation") == "next"), None
            )
            if not next_url:
                break
            page_url = urljoin(page_url, next_url)
            pages += 1
            response = self._send(
                "GET", page_url, what="manifest page", headers={"Accept": "application/json"}, deadline=deadline
            )
            if response.status_code != 200:
                raise ExportError(self._unexpected(response, "manifest page", page_url, "200"))
            page = self._json(response, "manifest page", page_url)
        outputs = sum(1 for f in files if f.kind == "output")
        self.progress(
            f"manifest ready: {outputs} files, {len(files) - outputs} deleted/error files, "
            f"{pages} page(s), transactionTime {transaction_time}"
        )
        return Manifest(transaction_time, request, requires_token, files, expires)

    def _manifest_file(self, kind: str, entry: object, page_url: str) -> ManifestFile:
        if not isinstance(entry, dict) or not entry.get("url"):
            raise ExportError(f"source {self.source}: manifest {page_url}: an {kind} entry has no url")
        default = {"deleted": "Bundle", "error": "OperationOutcome"}.get(kind, "")
        count = entry.get("count")
        # the IG wants absolute URLs; a relative one is read against the server's base, as its files live there
        return ManifestFile(
            kind,
            str(entry.get("type") or default),
            urljoin(self.settings.url.rstrip("/") + "/", str(entry["url"])),
            int(count) if isinstance(count, int | float) and not isinstance(count, bool) else None,
        )

    # --- downloads ----------------------------------------------------------------------------

    def download_all(self, manifest: Manifest, folder: Path) -> list[DownloadedFile]:
        """Every file of the manifest into `folder`, a bounded number at a time; any failure fails them all."""
        if manifest.expires_at and manifest.expires_at <= datetime.now(UTC):
            raise ExportExpired(f"source {self.source}: the export's files expired at {manifest.expires_at}")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        names = _file_names(manifest.files)
        with ThreadPoolExecutor(self.settings.parallel_downloads, thread_name_prefix="download") as pool:
            futures = [
                pool.submit(self._download, entry, folder / name, manifest.requires_access_token)
                for entry, name in zip(manifest.files, names, strict=True)
            ]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _download(self, entry: ManifestFile, target: Path, with_token: bool) -> DownloadedFile:
        retries = self.settings.download_retries
        for attempt in range(retries + 1):
            try:
                downloaded = self._download_once(entry, target, with_token)
            except _RetryableDownload as reason:
                target.with_name(target.name + ".part").unlink(missing_ok=True)
                if attempt == retries:
                    raise ExportError(
                        f"source {self.source}: file {target.name} ({entry.url}): {reason}, "
                        f"after {retries + 1} attempts; nothing was loaded"
                    ) from None
                wait = (
                    reason.wait
                    if reason.wait is not None
                    else backoff_seconds(attempt, base=self.settings.min_poll_seconds, cap=60.0)
                )
                self.progress(f"{target.name}: {reason}, retrying in {wait:.1f} s")
                self.sleep(wait)
                continue
            if entry.count is not None and downloaded.lines != entry.count:
                raise ExportError(
                    f"source {self.source}: file {target.name} ({entry.url}): the manifest announces {entry.count} "
                    f"resources, the download holds {downloaded.lines}; nothing was loaded"
                )
            self.progress(f"{target.name}: {downloaded.lines} records, {downloaded.bytes} bytes")
            return downloaded
        raise AssertionError("unreachable")

    def _download_once(self, entry: ManifestFile, target: Path, with_token: bool) -> DownloadedFile:
        import requests

        headers = {"Accept": "application/fhir+ndjson", "Accept-Encoding": "gzip"}
        if with_token:
            headers.update(self.auth.headers())
        try:
            response = self.session.get(
                entry.url, headers=headers, stream=True, timeout=self.settings.request_timeout_seconds
            )
        except requests.RequestException as error:
            raise _RetryableDownload(f"connection failed ({type(error).__name__})") from None
        with response:
            if response.status_code == 401 and with_token and self.auth.invalidate():
                raise _RetryableDownload("access token refused (401)", wait=0.0)
            if response.status_code == 429 or response.status_code >= 500:
                wait = retry_after_seconds(
                    response.headers.get("Retry-After"), cap=self.settings.max_retry_after_seconds
                )
                raise _RetryableDownload(f"HTTP {response.status_code}", wait=wait)
            if response.status_code in (404, 410):
                raise ExportExpired(
                    f"source {self.source}: file {target.name} ({entry.url}) answered "
                    f"{response.status_code}: the export's files are gone"
                )
            if response.status_code != 200:
                raise ExportError(self._unexpected(response, f"file {target.name}", entry.url, "200"))
            content_type = response.headers.get("Content-Type", "")
            if "html" in content_type.lower():
                raise ExportError(
                    f"source {self.source}: file {target.name} ({entry.url}) answered {content_type}, "
                    "not NDJSON; nothing was loaded"
                )
            return self._stream_to_file(response, entry, target)

    def _stream_to_file(self, response, entry: ManifestFile, target: Path) -> DownloadedFile:
        """Decompress (when gzip), split into lines, check each line's type, write and digest, chunk by chunk."""
        import requests
        import urllib3

        encoding = response.headers.get("Content-Encoding", "").lower()
        gzipped = "gzip" in encoding or entry.url.lower().split("?")[0].endswith(".gz")
        inflater = zlib.decompressobj(47) if gzipped else None  # 32 + 15: a gzip or zlib header
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        lines = size = 0
        pending = b""
        line_number = 0
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            try:
                for raw in response.raw.stream(CHUNK, decode_content=False):
                    data = inflater.decompress(raw) if inflater else raw
                    if not data:
                        continue
                    complete, _, pending = (pending + data).rpartition(b"\n")
                    if complete:
                        block = complete + b"\n"
                        for line in block.splitlines():
                            line_number += 1
                            if line.strip():
                                lines += 1
                                self._check_line(line, entry, target.name, line_number)
                        handle.write(block)
                        digest.update(block)
                        size += len(block)
            except zlib.error:
                raise ExportError(
                    f"source {self.source}: file {target.name} ({entry.url}): not a valid gzip "
                    "stream; nothing was loaded"
                ) from None
            except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
                raise _RetryableDownload(f"download interrupted ({type(error).__name__})") from None
            if inflater is not None:
                tail = inflater.flush()
                pending += tail
                if not inflater.eof:
                    raise ExportError(
                        f"source {self.source}: file {target.name} ({entry.url}): truncated gzip "
                        "stream (it ends before its last block); nothing was loaded"
                    )
            if pending.strip():
                line_number += 1
                lines += 1
                self._check_line(pending, entry, target.name, line_number)
                pending += b"\n"
            handle.write(pending)
            digest.update(pending)
            size += len(pending)
        os.replace(partial, target)
        return DownloadedFile(target.name, entry.kind, entry.type, lines, size, digest.hexdigest())

    def _check_line(self, line: bytes, entry: ManifestFile, name: str, line_number: int) -> None:
        """A line of another resource type than its file's is a server fault: the whole export is refused.
        Lines that are not JSON pass on to the batch, which quarantines them with their reason."""
        if not entry.type:
            return
        try:
            found = orjson.loads(line).get("resourceType")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if found != entry.type:
            raise ExportError(
                f"source {self.source}: file {name} ({entry.url}) line {line_number}: a {str(found)[:40]} resource "
                f"in a file the manifest lists as {entry.type}; nothing was loaded"
            )

    # --- cancel and clean up ------------------------------------------------------------------

    def delete(self, status_url: str) -> int:
        """DELETE on the status URL: cancels a running export, or lets the server drop a finished one's files."""
        import requests

        try:
            response = self.session.delete(
                status_url,
                headers={**self.auth.headers(), "Accept": "application/json"},
                timeout=self.settings.request_timeout_seconds,
            )
        except requests.RequestException as error:
            log.warning("source %s: DELETE %s failed (%s)", self.source, status_url, type(error).__name__)
            return 0
        return response.status_code

    # --- one request, with the retries every call shares -----------------------------------------

    def _send(self, method: str, url: str, *, what: str, headers: dict, deadline: float | None = None, data=None):
        """429, 5xx, transient OperationOutcomes and dropped connections are retried with backoff (within the
        deadline, or eight times); a 401 renews the token once."""
        import requests

        attempt = 0
        renewed = False
        while True:
            try:
                response = self.session.request(
                    method,
                    url,
                    headers={**headers, **self.auth.headers()},
                    data=data,
                    timeout=self.settings.request_timeout_seconds,
                )
            except requests.RequestException as error:
                response, reason = None, f"connection failed ({type(error).__name__})"
            else:
                if response.status_code == 401 and not renewed and self.auth.invalidate():
                    renewed = True
                    continue
                reason = self._retry_reason(response)
                if reason is None:
                    return response
            wait = None
            if response is not None:
                wait = retry_after_seconds(
                    response.headers.get("Retry-After"), cap=self.settings.max_retry_after_seconds
                )
            if wait is None:
                wait = backoff_seconds(attempt, base=self.settings.min_poll_seconds, cap=60.0)
            attempt += 1
            if deadline is None and attempt > 8:
                raise ExportError(f"source {self.source}: {what} {url}: {reason}, after {attempt} attempts")
            self.progress(f"{what}: {reason}, retrying in {wait:.1f} s")
            self._sleep_before(deadline, wait, f"{what} {url}")

    def _retry_reason(self, response) -> str | None:
        if response.status_code == 429:
            return "throttled (429)"
        if response.status_code >= 500 or response.status_code in (400, 408) or response.status_code == 409:
            codes = _issue_codes(response)
            if response.status_code >= 500 and (not codes or codes & RETRYABLE_ISSUE_CODES):
                return f"server error {response.status_code}"
            if codes & RETRYABLE_ISSUE_CODES:
                return f"transient failure ({', '.join(sorted(codes))})"
        return None

    def _sleep_before(self, deadline: float | None, wait: float, what: str) -> None:
        if deadline is not None and time.time() + wait > deadline:
            raise ExportError(
                f"source {self.source}: {what}: the export did not finish before its deadline "
                f"({self.settings.deadline_minutes:g} min); it stays recorded and the next run "
                "polls it again"
            )
        self.sleep(wait)

    def _json(self, response, what: str, url: str) -> dict:
        content_type = response.headers.get("Content-Type", "")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ExportError(
                f"source {self.source}: {what} {url} answered {content_type or 'no content type'}, "
                "not JSON; nothing was loaded"
            )
        return body

    def _unexpected(self, response, what: str, url: str, expected: str) -> str:
        content_type = response.headers.get("Content-Type", "") or "no content type"
        detail = _outcome_summary(response)
        if "html" in content_type.lower():
            detail = "an HTML page, not a FHIR response (a login page or a proxy in front of the server?)"
        return (
            f"source {self.source}: {what} {url} answered HTTP {response.status_code} ({content_type}) where "
            f"{expected} was expected: {detail or 'no OperationOutcome'}; nothing was loaded"
        )


class _RetryableDownload(Exception):
    def __init__(self, reason: str, *, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


def _file_names(files: list[ManifestFile]) -> list[str]:
    """Our own names (`Patient.000.ndjson`, `deleted.000.ndjson`, `error.000.ndjson`): servers name files anyhow,
    and a name is what the batch reads a file's resource type from."""
    seen: dict[str, int] = {}
    names = []
    for entry in files:
        stem = entry.type if entry.kind == "output" else entry.kind
        number = seen.get(stem, 0)
        seen[stem] = number + 1
        names.append(f"{stem}.{number:03d}.ndjson")
    return names


def _outcome(response) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        body = next(
            (
                e.get("resource")
                for e in body.get("entry") or []
                if (e.get("resource") or {}).get("resourceType") == "OperationOutcome"
            ),
            None,
        )
    return body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None


def _issue_codes(response) -> set[str]:
    outcome = _outcome(response)
    return {str(i.get("code")) for i in (outcome or {}).get("issue") or [] if isinstance(i, dict)}


def _outcome_summary(response) -> str:
    """Severity, code and the server's words, with what could name a patient (a reference, a long number) masked:
    this text goes into exceptions, logs and alerts."""
    outcome = _outcome(response)
    if not outcome:
        return ""
    parts = []
    for issue in (outcome.get("issue") or [])[:3]:
        text = str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")[:160]
        text = LONG_NUMBER.sub("…", REFERENCE_LIKE.sub(r"\1/…", text))
        parts.append(f"{issue.get('severity', '?')}/{issue.get('code', '?')} {text}".strip())
    return "; ".join(parts)


def _expires(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
