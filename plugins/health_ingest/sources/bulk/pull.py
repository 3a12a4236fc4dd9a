"""Pull a source's export: resume or kick off, poll, download; then, for its batch, the commit hook that moves `_since`
and the release of the server's files.

The DAG, the CLI and the tests call `pull_export`, then `batch.load.load_delivery` loads it. Every step leaves
`ingest.source_state` so that a crash anywhere resumes where it stood: a run that finds an export in flight polls
its status URL again instead of starting a new one, and one that finds it downloaded loads it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from health_ingest.errors import ConfigurationError, ExportError, ExportExpired
from health_ingest.sources.bulk import state as export_state
from health_ingest.sources.bulk.auth import Authoriser, load_credentials
from health_ingest.sources.bulk.client import BulkClient, DownloadedFile, Progress
from health_ingest.sources.landing import EXPORT_RECORD
from health_ingest.sources.registry import Source

log = logging.getLogger(__name__)

PULL_LOCK_PREFIX = "health_ingest:pull:"


@dataclass(frozen=True)
class PulledExport:
    delivery: Path
    transaction_time: str
    files: list[DownloadedFile]
    resumed: bool
    kick_offs: int

    @property
    def records(self) -> int:
        return sum(f.lines for f in self.files if f.kind == "output")


def pull_export(
    source: Source,
    *,
    full_refresh: bool = False,
    url: str | None = None,
    progress: Progress | None = None,
    warehouse: str | None = None,
    session=None,
) -> PulledExport:
    """Download the source's next export into the exports folder, resuming the one in flight if any."""
    with _pulling(source, warehouse, _client(source, _settings(source, url), progress, session)) as (conn, client):
        return _pull(conn, client, source, full_refresh=full_refresh)


def prepare_export(source: Source, *, full_refresh: bool = False, warehouse: str | None = None) -> dict:
    """The first half of a pull, for a task that waits in the triggerer rather than on a worker: the export
    downloaded already ({"delivery": folder}), or the one in flight, kicked off if need be ({"status_url",
    "deadline"}: what to poll, and until when)."""
    with _pulling(source, warehouse, _client(source, _settings(source, None), None, None)) as (conn, client):
        waiting = _downloaded_export(conn, client, source, full_refresh=full_refresh)
        if waiting is not None:
            return {"delivery": str(waiting.delivery)}
        current = export_state.read_state(conn, source.name)
        if current.status_url:
            status_url, kicked_off = current.status_url, current.kicked_off_at
        else:
            status_url, _, kicked_off, _ = _kick_off(conn, client, source, full_refresh=full_refresh)
        return {"status_url": status_url, "deadline": kicked_off.timestamp() + client.settings.deadline_minutes * 60}


def status_wait(source: Source, status_url: str, attempt: int = 0) -> float | None:
    """One poll of an export's status: None when its manifest is ready, else the seconds to wait. Raises
    ExportExpired when the server no longer knows it."""
    return _client(source, _settings(source, None), None, None).status_wait(status_url, attempt)


def release_export(source: Source, delivery: Path) -> None:
    """After the commit: tell the server (DELETE) it may drop the files, and drop our download (landing keeps
    its own copy). A no-op for a delivery that is not a pulled export."""
    record = read_export_record(delivery)
    if not record:
        return
    if record.get("status_url") and source.bulk is not None:
        client = _client(source, _settings(source, None), None, None)
        status = client.delete(record["status_url"])
        log.info("source %s: export's files released on the server (DELETE answered %s)", source.name, status)
    shutil.rmtree(delivery, ignore_errors=True)


def download_once(url: str, folder: Path, *, progress: Progress | None = None, session=None) -> Path:
    """A one-off: kick off, poll and download a server's full export into `folder`, with no source state."""
    from health_ingest.sources.bulk.settings import BulkSettings

    settings = BulkSettings(url=url)
    client = BulkClient(
        "one-off",
        settings,
        Authoriser(load_credentials(None), url, _session(settings, session), source="one-off"),
        _session(settings, session),
        progress=progress,
    )
    status_url, _ = client.kick_off(None)
    manifest = client.wait_for_manifest(status_url, deadline=time.time() + settings.deadline_minutes * 60)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigurationError(f"{folder}: exists and is not empty")
    files = client.download_all(manifest, folder)
    client.delete(status_url)
    client.progress(f"{sum(f.lines for f in files if f.kind == 'output')} records in {len(files)} files")
    return folder


def cancel_export(source: Source, *, warehouse: str | None = None, session=None) -> str:
    """Send DELETE to the status URL of the export in flight and forget it; `_since` does not move."""
    from health_ingest.warehouse.connection import connect, warehouse_url

    conn = connect(warehouse or warehouse_url())
    conn.autocommit = True
    try:
        current = export_state.read_state(conn, source.name)
        if not current.status_url:
            return f"source {source.name}: no export in flight"
        client = _client(source, _settings(source, None), None, session)
        status = client.delete(current.status_url)
        export_state.forget_export(conn, source.name)
        if current.delivery:
            shutil.rmtree(current.delivery, ignore_errors=True)
        return f"source {source.name}: export cancelled (DELETE answered {status or 'nothing'})"
    finally:
        conn.close()


def commit_hook(source: Source, delivery: Path):
    """For a delivery that is a pulled export, the last step of its load transaction: every file loaded is the file
    downloaded (same SHA-256), then the source's `_since` moves. None for any other delivery."""
    record = read_export_record(delivery)
    if not record:
        return None

    def check_and_move_since(cur, batch_id: str) -> None:
        cur.execute("SELECT file_name, sha256 FROM ingest.batch_files WHERE batch_id = %s", (batch_id,))
        landed = dict(cur.fetchall())
        for downloaded in record["files"]:
            if landed.get(downloaded["name"]) != downloaded["sha256"]:
                raise ExportError(
                    f"source {source.name}: file {downloaded['name']}: what was loaded is not what was downloaded "
                    "(its SHA-256 differs); nothing was committed"
                )
        export_state.commit_export(cur, source.name, record["transaction_time"], batch_id)

    return check_and_move_since


def read_export_record(delivery: Path) -> dict:
    path = Path(delivery) / EXPORT_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# --- implementation details -------------------------------------------------------------------


@contextmanager
def _pulling(source: Source, warehouse: str | None, client: BulkClient) -> Iterator[tuple[object, BulkClient]]:
    """The warehouse connection of a pull (migrated, holding the source's pull lock until it closes)."""
    from health_ingest.warehouse.connection import connect, warehouse_url
    from health_ingest.warehouse.migrations import require_migrated

    conn = connect(warehouse or warehouse_url())
    conn.autocommit = True
    try:
        require_migrated(conn)
        _lock(conn, source.name)
        yield conn, client
    finally:
        conn.close()


def _pull(conn, client: BulkClient, source: Source, *, full_refresh: bool) -> PulledExport:
    waiting = _downloaded_export(conn, client, source, full_refresh=full_refresh)
    if waiting is not None:
        return waiting
    current = export_state.read_state(conn, source.name)
    kick_offs = 0
    resumed = restarted = False
    while True:
        if current.status_url:
            resumed = True
            client.progress(f"resuming the export kicked off at {current.kicked_off_at:%Y-%m-%d %H:%M:%S} UTC")
            status_url, request, kicked_off = current.status_url, current.request or "", current.kicked_off_at
            full = current.full_refresh
        else:
            status_url, request, kicked_off, full = _kick_off(conn, client, source, full_refresh=full_refresh)
            kick_offs += 1
        deadline = kicked_off.timestamp() + client.settings.deadline_minutes * 60
        try:
            manifest = client.wait_for_manifest(status_url, deadline=deadline)
            export_state.record_manifest(conn, source.name, manifest.transaction_time, manifest.expires_at)
            folder = _export_folder(source, manifest.transaction_time)
            shutil.rmtree(folder, ignore_errors=True)  # what a crashed download left
            files = client.download_all(manifest, folder)
        except ExportExpired as expired:
            export_state.forget_export(conn, source.name)
            if restarted:
                raise ExportError(f"{expired}; the export started again expired as well, giving up") from None
            restarted, resumed = True, False
            client.progress(f"{expired}; kicking off a new export")
            current = export_state.read_state(conn, source.name)
            continue
        record = {
            "source": source.name,
            "status_url": status_url,
            "request": request,
            "transaction_time": manifest.transaction_time,
            "full_refresh": full,
            "files": [vars(f) for f in files],
        }
        (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        export_state.record_downloaded(conn, source.name, str(folder))
        pulled = PulledExport(folder, manifest.transaction_time, files, resumed, kick_offs)
        client.progress(f"export downloaded: {pulled.records} records in {len(files)} files")
        return pulled


def _downloaded_export(conn, client: BulkClient, source: Source, *, full_refresh: bool) -> PulledExport | None:
    """The export already downloaded and waiting for its batch, if any (after a full refresh asked for has
    cancelled an incremental export in flight, and a download changed on disk since has been dropped)."""
    current = export_state.read_state(conn, source.name)
    if current.status_url and full_refresh and not current.full_refresh:
        client.progress("a full refresh replaces the incremental export in flight: cancelling it")
        client.delete(current.status_url)
        export_state.forget_export(conn, source.name)
        current = export_state.read_state(conn, source.name)
    if current.delivery and read_export_record(Path(current.delivery)):
        record = read_export_record(Path(current.delivery))
        if _intact(Path(current.delivery), record):
            client.progress(f"the export of {current.transaction_time} is downloaded and waits for its batch")
            files = [DownloadedFile(**f) for f in record["files"]]
            return PulledExport(Path(current.delivery), record["transaction_time"], files, True, 0)
        client.progress("the downloaded export changed on disk since: downloading it again")
        shutil.rmtree(current.delivery, ignore_errors=True)
    return None


def _kick_off(conn, client: BulkClient, source: Source, *, full_refresh: bool) -> tuple[str, str, datetime, bool]:
    """A new export from the source's `_since` (none for a full refresh), recorded before anything else."""
    current = export_state.read_state(conn, source.name)
    since = None if full_refresh or current.since is None else _instant(current.since)
    status_url, request = client.kick_off(since)
    export_state.record_kick_off(conn, source.name, status_url, request, full_refresh=since is None)
    return status_url, request, datetime.now(UTC), since is None


def _intact(folder: Path, record: dict) -> bool:
    """Every file of the record is there with the digest it was downloaded with."""
    from health_ingest.sources.landing import file_sha256

    return all(
        (folder / f["name"]).is_file() and file_sha256(folder / f["name"]) == f["sha256"] for f in record["files"]
    )


def _instant(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _export_folder(source: Source, transaction_time: str) -> Path:
    stamp = "".join(c for c in transaction_time if c.isalnum())[:20] or str(int(time.time()))
    return source.exports / f"export-{stamp}"


def _settings(source: Source, url: str | None):
    if url:
        from health_ingest.sources.bulk.settings import BulkSettings

        return replace(source.bulk, url=url) if source.bulk else BulkSettings(url=url)
    if source.bulk is None:
        raise ConfigurationError(f"source {source.name} declares no 'bulk:' server to pull from (or give --url)")
    return source.bulk


def _session(settings, session=None):
    import requests
    from requests.adapters import HTTPAdapter

    if session is not None:
        return session
    session = requests.Session()
    adapter = HTTPAdapter(pool_maxsize=max(4, settings.parallel_downloads + 2))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "health-ingest"
    return session


def _client(source: Source, settings, progress: Progress | None, session) -> BulkClient:
    session = _session(settings, session)
    authoriser = Authoriser(load_credentials(settings.connection), settings.url, session, source=source.name)
    return BulkClient(source.name, settings, authoriser, session, progress=progress)


def _lock(conn, source: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (PULL_LOCK_PREFIX + source,))
        if not cur.fetchone()[0]:
            raise ExportError(f"source {source}: another pull of this source is running")
