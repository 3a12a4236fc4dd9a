"""The life of every batch, whatever its format: the source's lock, the batch row, one load transaction, the counts,
and on failure a rollback with a message that quotes no record.

A format plugs in through a `Loader` (`fhir.FhirLoader`, `claims.ClaimsLoader`): `run_batch` opens the batch and
hands the loader a `BatchContext`; the loader lands, reads, stages and merges, then ends its transaction with
`BatchLoader.commit`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psycopg2

from health_ingest import config
from health_ingest.deliveries import FileCounts, LandedDelivery
from health_ingest.errors import BatchRejected, HealthIngestError, LoadError, retryable
from health_ingest.privacy.gate import KAnonymityReport, record_k_anonymity
from health_ingest.privacy.keyring import Keyring, load_keyring
from health_ingest.quality.ceiling import FileQuarantine, check_quarantine_ceiling
from health_ingest.quality.suites import record_outcomes
from health_ingest.sources.inbox import says_nothing_of_a_person
from health_ingest.sources.landing import disk_full, free_space
from health_ingest.sources.references import keyed_delivery_name
from health_ingest.sources.registry import Source
from health_ingest.warehouse import batches, merge, staging
from health_ingest.warehouse.connection import connect, hosting_decision, warehouse_url
from health_ingest.warehouse.migrations import require_migrated

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, bool], None]  # file name, records so far, file done
BeforeCommit = Callable[[object, str], None]  # (cursor, batch id): last writes of the load transaction
QUOTED = re.compile(r'"[^"]*"')
# PostgreSQL's class 53 (insufficient resources), said in an operator's words: the warehouse, not the batch, is short
WAREHOUSE_SHORT_OF = {
    "53100": "no space left on the warehouse's disk",
    "53200": "the warehouse ran out of memory",
    "53300": "the warehouse has too many connections open",
    "53400": "the batch went past a limit set on the warehouse",
}


@dataclass
class TypeCounts:
    rows_read: int = 0
    rows_loaded: int = 0
    rows_quarantined: int = 0


@dataclass
class StepTimes:
    """Seconds per step. Check and pseudonymise are CPU seconds summed over the workers; they overlap with
    reading and with PostgreSQL's staging and merging, so the steps add up to more than the wall time."""

    land: float = 0.0
    read: float = 0.0
    check: float = 0.0
    pseudonymise: float = 0.0
    stage: float = 0.0
    verify: float = 0.0
    suites: float = 0.0  # the quality suites (FHIR: on their own connection, beside the merges)
    suites_waited: float = 0.0  # what the batch waited for them once its merges were done (part of verify)
    commit: float = 0.0


@dataclass
class BatchResult:
    batch_id: str
    source: str
    status: str
    key_id: str
    input_sha256: str
    counts: dict[str, TypeCounts]
    skipped_files: list[str]
    elapsed: float
    commit_seq: int | None = None
    times: StepTimes = field(default_factory=StepTimes)
    tables: dict[str, str] = field(default_factory=dict)  # each key of `counts`: its warehouse table (schema.table)
    strict_warnings: dict[str, int] = field(default_factory=dict)  # strict validation's warnings, by rule

    @property
    def rows_read(self) -> int:
        return sum(c.rows_read for c in self.counts.values())

    @property
    def rows_loaded(self) -> int:
        return sum(c.rows_loaded for c in self.counts.values())

    @property
    def rows_quarantined(self) -> int:
        return sum(c.rows_quarantined for c in self.counts.values())

    def to_summary(self) -> dict:
        """A JSON-safe summary with counts only (it travels through XCom and logs)."""
        return {
            "batch_id": self.batch_id,
            "source": self.source,
            "status": self.status,
            "commit_seq": self.commit_seq,
            "key_id": self.key_id,
            "rows_read": self.rows_read,
            "rows_loaded": self.rows_loaded,
            "rows_quarantined": self.rows_quarantined,
            "by_type": {t: vars(c) for t, c in sorted(self.counts.items())},
            "skipped_files": self.skipped_files,
            "elapsed_seconds": round(self.elapsed, 3),
            **({"strict_warnings": self.strict_warnings} if self.strict_warnings else {}),
        }


@dataclass(frozen=True)
class BatchContext:
    """What a loader is given for one batch: which batch, of which source, under which key, into which warehouse."""

    batch_id: str
    source: Source
    keyring: Keyring
    warehouse: str
    progress: ProgressCallback | None = None
    before_commit: BeforeCommit | None = None  # runs last in the load transaction (a pulled export's `_since`)


class Loader(Protocol):
    """One format's load transaction. `position` says where it stands, so that a failure can say where it happened
    without quoting a record; `before_commit` (from the context) runs in `BatchLoader.commit`."""

    position: str
    before_commit: BeforeCommit | None
    file_counts: dict[int, FileCounts]  # what the reader saw so far, per file: a failed batch keeps it

    def load(self, conn, copy_conn, delivery: Path) -> BatchResult:
        """Land, read, stage and merge the delivery; `copy_conn` stages (autocommit), `conn` holds the transaction
        that ends with `BatchLoader.commit` and commits."""
        ...

    def warehouse_table(self, name: str) -> str:
        """The warehouse table (`schema.table`) of a resource type or a file's table."""
        ...


class LoaderClass(Protocol):
    """A format's loader, made for one batch; it also knows where a batch of its format keeps its spools."""

    def __call__(self, context: BatchContext) -> Loader: ...

    def remove_spools(self, folder: Path) -> None:
        """Remove the spools a batch of this format left in its landing folder `folder` when its process died
        (a batch that ends, committed or failed, removes its own); its landing copy stays, as a failed batch's."""
        ...


class BatchLoader:
    """What every format's loader holds of its batch, and the steps every format ends with (ceiling, commit); a
    loader adds `load` and `warehouse_table`."""

    def __init__(self, context: BatchContext) -> None:
        self.batch_id, self.source, self.warehouse = context.batch_id, context.source, context.warehouse
        self.keyring, self.key_id = context.keyring, context.keyring.active_id
        self.progress = context.progress
        self.before_commit: BeforeCommit | None = context.before_commit
        self.position = "while landing the delivery"
        self.times = StepTimes()
        self.file_counts: dict[int, FileCounts] = {}  # what the reader saw so far, per file: a failed batch keeps it

    @property
    def landing(self) -> Path:
        """Where the batch's delivery is copied: the ingestion zone, one folder per source and batch."""
        return self.landing_of(self.source, self.batch_id)

    @staticmethod
    def landing_of(source: Source, batch_id: str) -> Path:
        """The landing folder of any batch of the source, this loader's or another's (one gone, failed)."""
        return config.state_dir() / "landing" / source.name / batch_id

    def check_ceiling(self, landed: LandedDelivery, file_counts: dict[int, FileCounts]) -> None:
        """Once every record is read: a file (or a type, or a table) mostly quarantined rejects the batch, by name.
        Records superseded by a later one of the same key are not faults and do not count."""
        self.position = "while checking the quarantine ceiling"
        files = [
            FileQuarantine(f.name, f.resource_type, counts.rows_read, counts.rows_quarantined - counts.rows_superseded)
            for f in landed.loadable
            for counts in [file_counts[f.file_no]]
        ]
        check_quarantine_ceiling(files, self.source.quality)

    def commit(self, cur, landed: LandedDelivery, file_counts: dict[int, FileCounts], started: float) -> BatchResult:
        """The end of every load transaction: the files recorded, the batch marked committed with its counts, then
        the caller's last writes (`before_commit`). Returns the batch's result, for once the transaction commits."""
        merge.record_files(cur, self.batch_id, landed, file_counts)
        counts = counts_by_type(landed, file_counts)
        totals = TypeCounts(*(sum(getattr(c, k) for c in counts.values()) for k in vars(TypeCounts())))
        commit_seq = batches.mark_committed(
            cur,
            self.batch_id,
            rows_read=totals.rows_read,
            rows_loaded=totals.rows_loaded,
            rows_quarantined=totals.rows_quarantined,
            input_sha256=landed.input_sha256,
            step_seconds={
                **{step: round(seconds, 4) for step, seconds in vars(self.times).items()},
                "elapsed": round(time.perf_counter() - started, 4),
            },
            privacy_removed=getattr(self, "privacy_removed", None),
        )
        if self.before_commit is not None:
            self.before_commit(cur, self.batch_id)
        return BatchResult(
            batch_id=self.batch_id,
            source=self.source.name,
            status="committed",
            key_id=self.key_id,
            input_sha256=landed.input_sha256,
            counts=counts,
            skipped_files=[f.name for f in landed.files if f.skip_reason],
            elapsed=0.0,
            commit_seq=commit_seq,
            times=self.times,
            tables={name: self.warehouse_table(name) for name in counts},
        )


@dataclass(frozen=True)
class StageFailure:
    """An error of a stage thread, handed down its queue to the load transaction with where the stage was."""

    error: BaseException
    position: str


def run_batch(
    delivery: Path,
    source: Source,
    kind: str,
    make_loader: LoaderClass,
    *,
    url: str | None = None,
    keyring: Keyring | None = None,
    progress: ProgressCallback | None = None,
    before_commit: BeforeCommit | None = None,
) -> BatchResult:
    """The life of any batch: the source's lock, the batch row, the loader's transaction, and on failure a
    rollback, a 'failed' (or 'rejected') row with a message that quotes no record, and the staging dropped."""
    started = time.perf_counter()
    keyring = keyring or load_keyring()
    warehouse = url or warehouse_url()
    conn = connect(warehouse)
    copy_conn = None
    batch_id = None
    try:
        conn.autocommit = True
        require_migrated(conn)
        batches.lock_source(conn, source.name)
        for abandoned_id in batches.fail_abandoned_batches(conn, source.name):
            make_loader.remove_spools(BatchLoader.landing_of(source, abandoned_id))
            log.warning(
                "source %s: batch %s was left loading by a process that is gone (and its session with it): marked "
                "failed, nothing of it was committed, its staging dropped and its spools removed",
                source.name,
                abandoned_id,
            )
        with conn.cursor() as cur:
            staging.drop_leftover_staging(cur)
        batch_id = batches.open_batch(
            conn,
            source=source.name,
            kind=kind,
            key_id=keyring.active_id,
            delivery=_stored_delivery_name(Path(delivery).name, keyring, source),
            hosting=hosting_decision(warehouse).describe(),
        )
        log.info("source %s: batch %s started (key %s)", source.name, batch_id, keyring.active_id)
        loader = make_loader(BatchContext(batch_id, source, keyring, warehouse, progress, before_commit))
        copy_conn = connect(warehouse)
        copy_conn.autocommit = True
        try:
            result = loader.load(conn, copy_conn, Path(delivery))
        except BaseException as error:
            _fail(conn, warehouse, source, batch_id, error, loader)
        result.elapsed = time.perf_counter() - started
        log.info(
            "source %s: batch %s committed: %d read = %d loaded + %d quarantined in %.1f s",
            source.name,
            batch_id,
            result.rows_read,
            result.rows_loaded,
            result.rows_quarantined,
            result.elapsed,
        )
        return result
    except psycopg2.Error as error:  # around the load: the lock, the batch row
        raise LoadError(f"source {source.name}: {_safe_message(error, 'while opening the batch')}") from None
    finally:
        if batch_id is not None:
            _drop_staging(copy_conn, warehouse, batch_id)
        for connection in (copy_conn, conn):
            if connection is not None:
                with contextlib.suppress(psycopg2.Error):
                    connection.close()


def counts_by_type(landed: LandedDelivery, file_counts: dict[int, FileCounts]) -> dict[str, TypeCounts]:
    """Per resource type (or claims table), the counts of its files."""
    counts: dict[str, TypeCounts] = {}
    for landed_file in landed.loadable:
        per_file = file_counts[landed_file.file_no]
        total = counts.setdefault(landed_file.resource_type, TypeCounts())
        total.rows_read += per_file.rows_read
        total.rows_loaded += per_file.rows_loaded
        total.rows_quarantined += per_file.rows_quarantined
    return counts


# --- implementation details -------------------------------------------------------------------


def _fail(conn, warehouse: str, source: Source, batch_id: str, error: BaseException, loader):
    """Roll back, mark the batch with what its reader saw and where it stopped, keep a rejection's evidence, and
    raise the batch's error (which says whether a retry can help: that of the cause; and which batch it was). A
    batch whose connection was lost is marked on a fresh one."""
    message = _safe_message(error, loader.position)
    if disk_full(error):
        message = _free_the_full_disk(loader)
    status = _failure_status(error)
    seen = list(loader.file_counts.values())
    counts = {
        "rows_read": sum(c.rows_read for c in seen),
        "rows_quarantined": sum(c.rows_quarantined for c in seen),
        "failed_step": loader.position.removeprefix("while "),
    }
    recorded = _record_failure(conn, warehouse, batch_id, message, status, error, counts)
    log.error("source %s: batch %s %s, nothing committed: %s", source.name, batch_id, status, message)
    if not isinstance(error, HealthIngestError | psycopg2.Error) and not disk_full(error):
        log.error("where it failed:\n%s", "".join(traceback.format_tb(error.__traceback__)))
    if isinstance(error, KeyboardInterrupt):
        raise error
    failure_class = BatchRejected if isinstance(error, BatchRejected) else LoadError
    if not recorded:
        message += "; the warehouse could not be told, so the next run of this source marks the batch failed"
    failure = failure_class(f"batch {batch_id} of source {source.name} {status}: {message}", retryable=retryable(error))
    failure.batch_id = batch_id
    raise failure from None


def _record_failure(
    conn, warehouse: str, batch_id: str, message: str, status: str, error: BaseException, counts: dict
) -> bool:
    """Mark the batch failed (or rejected) after the rollback, on its own connection or, when that is lost, on a
    fresh one. False when the warehouse cannot be reached: the next run of the source marks it then."""
    try:
        conn.rollback()
        conn.autocommit = True
        target = conn
    except psycopg2.Error:
        try:
            target = connect(warehouse)
            target.autocommit = True
        except (psycopg2.Error, HealthIngestError):
            return False
    try:
        batches.mark_failed(target, batch_id, message, status=status, **counts)
        if isinstance(error, BatchRejected):
            _record_rejection_evidence(target, batch_id, error.evidence)
        return True
    except psycopg2.Error:
        return False
    finally:
        if target is not conn:
            target.close()


def _free_the_full_disk(loader: BatchLoader) -> str:
    """Once landed, a batch writes only inside its landing folder (its Bundles' entries, its spools, the escrow's
    spool): a disk that fills during its load is the landing zone's. The failed batch's folder is removed, so that
    the disk it filled does not stay full for the next run; the message says how much is free then."""
    folder = loader.landing
    shutil.rmtree(folder, ignore_errors=True)
    return (
        f"no space left on the landing zone's disk {loader.position}; the batch's landing copy and spools were "
        f"removed ({free_space(folder)} on that disk now)"
    )


def _drop_staging(copy_conn, warehouse: str, batch_id: str) -> None:
    """Drop the batch's staging, on a fresh connection if the batch's own is lost; what cannot be dropped now is
    dropped by the next run (`drop_leftover_staging`)."""
    for attempt in (copy_conn, None):
        try:
            target = attempt or connect(warehouse)
            target.autocommit = True
            with target.cursor() as cur:
                staging.drop_staging_tables(cur, batch_id)
            if attempt is None:
                target.close()
            return
        except (psycopg2.Error, HealthIngestError):
            continue


def _record_rejection_evidence(conn, batch_id: str, evidence: object) -> None:
    """A rejected batch keeps why: the gate's report, written after the rollback, and its Data Docs."""
    with conn.cursor() as cur:
        if isinstance(evidence, KAnonymityReport):
            record_k_anonymity(cur, batch_id, evidence)
        elif isinstance(evidence, list):
            record_outcomes(cur, batch_id, evidence)
    if isinstance(evidence, list):
        from health_ingest.quality.docs import publish_data_docs

        publish_data_docs(conn, batch_id)


def _stored_delivery_name(name: str, keyring: Keyring, source: Source) -> str:
    """The folder's name is the sender's, sometimes a patient's: kept when made of an export's words, dates and
    numbers, else a keyed label of it (the same for the same name)."""
    if says_nothing_of_a_person(name):
        return name
    return keyed_delivery_name(name, keyring, source)


def _failure_status(error: BaseException) -> str:
    return "rejected" if isinstance(error, BatchRejected) else "failed"


def _safe_message(error: BaseException, position: str) -> str:
    """An error message that cannot quote a record: PostgreSQL's detail and context lines are left out."""
    if isinstance(error, HealthIngestError):
        return str(error)
    pgcode = getattr(error, "pgcode", None)
    if isinstance(error, psycopg2.OperationalError | psycopg2.InterfaceError) and (
        pgcode is None or pgcode.startswith(("08", "57P"))
    ):
        words = QUOTED.sub('"..."', (str(error).strip().splitlines() or ["closed"])[0])
        return f"the connection to the warehouse was lost ({words}) {position}"
    if pgcode is not None:
        diag = getattr(error, "diag", None)
        # PostgreSQL quotes input values in some primary messages: keep the words, drop the quotes
        primary = QUOTED.sub('"..."', getattr(diag, "message_primary", None) or "no message")
        if pgcode in WAREHOUSE_SHORT_OF:
            return f"{WAREHOUSE_SHORT_OF[pgcode]} (PostgreSQL error {pgcode}: {primary}) {position}"
        return f"PostgreSQL error {pgcode} ({primary}) {position}"
    if isinstance(error, OSError) and error.strerror:  # its words only: its file name may be a delivered one
        return f"{type(error).__name__} ({error.strerror}) {position}"
    return f"{type(error).__name__} {position}"
