"""One batch, end to end, without Airflow: land, read, check, pseudonymise, stage, verify, commit.

DAG tasks, the CLI and the tests all call `run_fhir_batch`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import re
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from health_ingest import config
from health_ingest.encoding import FileEncoder, release_free_memory
from health_ingest.errors import BatchRejected, HealthIngestError, LoadError
from health_ingest.privacy.gate import KAnonymityReport, check_k_anonymity, record_k_anonymity
from health_ingest.privacy.keyring import Keyring, load_keyring
from health_ingest.privacy.tokens import Tokeniser
from health_ingest.quality.reconcile import reconcile_part
from health_ingest.quality.suites import evaluate_batch, quality_gate, record_outcomes
from health_ingest.sources.landing import LandedDelivery, LandedFile, land_fhir_delivery
from health_ingest.sources.registry import Source
from health_ingest.warehouse import batches, merge, staging
from health_ingest.warehouse.connection import connect, hosting_decision, warehouse_url
from health_ingest.warehouse.deletions import apply_deletions, record_export_errors
from health_ingest.warehouse.migrations import require_migrated

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, bool], None]  # file name, records so far, file done
BeforeCommit = Callable[[object, str], None]  # (cursor, batch id): last writes of the load transaction
ESCROW_SPOOL = "escrow.copy"
SPOOL_BYTES = 16 << 20  # a file's spool is staged in parts of about this size, while the workers encode the next
QUOTED = re.compile(r'"[^"]*"')


@dataclass
class FileCounts:
    """What the reader saw in one file; each part of it is reconciled with what PostgreSQL staged."""

    rows_read: int = 0
    rows_quarantined: int = 0

    @property
    def rows_loaded(self) -> int:
        return self.rows_read - self.rows_quarantined


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
        }


def run_fhir_batch(
    delivery: Path,
    source: Source,
    *,
    url: str | None = None,
    keyring: Keyring | None = None,
    progress: ProgressCallback | None = None,
    before_commit: BeforeCommit | None = None,
) -> BatchResult:
    """Load one FHIR delivery as one batch: all of it commits, or nothing does and the batch is marked failed.

    `before_commit` runs inside the load transaction (a pulled export's next `_since` moves there)."""
    return run_batch(
        delivery,
        source,
        "fhir",
        _BatchLoader,
        url=url,
        keyring=keyring,
        progress=progress,
        before_commit=before_commit,
    )


def run_batch(
    delivery: Path,
    source: Source,
    kind: str,
    loader_class,
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
    try:
        conn.autocommit = True
        require_migrated(conn)
        batches.lock_source(conn, source.name)
        abandoned = batches.fail_abandoned_batches(conn, source.name)
        if abandoned:
            log.warning("source %s: marked %d abandoned batch(es) as failed", source.name, len(abandoned))
            with conn.cursor() as cur:
                for abandoned_id in abandoned:
                    staging.drop_staging_tables(cur, abandoned_id)
        batch_id = batches.open_batch(
            conn,
            source=source.name,
            kind=kind,
            key_id=keyring.active_id,
            delivery=Path(delivery).name,
            hosting=hosting_decision(warehouse).describe(),
        )
        log.info("source %s: batch %s started (key %s)", source.name, batch_id, keyring.active_id)
        loader = loader_class(batch_id, source, keyring, progress, warehouse)
        loader.before_commit = before_commit
        copy_conn = connect(warehouse)
        copy_conn.autocommit = True
        try:
            result = loader.load(conn, copy_conn, Path(delivery))
        except BaseException as error:
            message = _safe_message(error, loader.position)
            conn.rollback()
            conn.autocommit = True
            batches.mark_failed(conn, batch_id, message, status=_failure_status(error))
            if isinstance(error, BatchRejected):
                _record_rejection_evidence(conn, batch_id, error.evidence)
            log.error(
                "source %s: batch %s %s, nothing committed: %s", source.name, batch_id, _failure_status(error), message
            )
            if not isinstance(error, HealthIngestError):
                log.error("where it failed:\n%s", "".join(traceback.format_tb(error.__traceback__)))
            if isinstance(error, KeyboardInterrupt):
                raise
            failure = BatchRejected if isinstance(error, BatchRejected) else LoadError
            raise failure(f"batch {batch_id} of source {source.name} {_failure_status(error)}: {message}") from None
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
    finally:
        if copy_conn is not None:
            with copy_conn.cursor() as cur:
                staging.drop_staging_tables(cur, batch_id)
            copy_conn.close()
        conn.close()


# --- implementation details -------------------------------------------------------------------


class _BatchLoader:
    """The load transaction of one batch. Keeps its position so that errors can say where they happened."""

    def __init__(
        self, batch_id: str, source: Source, keyring: Keyring, progress: ProgressCallback | None, warehouse: str
    ):
        self.batch_id = batch_id
        self.warehouse = warehouse
        self.source = source
        self.key_id = keyring.active_id
        self.keyring = keyring
        self.progress = progress
        self.position = "while landing the delivery"
        self._producer_position = "while reading the delivery"
        self.times = StepTimes()
        self.outcomes: list = []  # the quality suites' results, gathered type by type
        self.before_commit: BeforeCommit | None = None

    def load(self, conn, copy_conn, delivery: Path) -> BatchResult:
        """`copy_conn` stages (autocommit); `conn` holds the load transaction that merges and commits."""
        clock = started = time.perf_counter()
        landing = config.state_dir() / "landing" / self.source.name / self.batch_id
        landed = land_fhir_delivery(delivery, landing)
        self.times.land = time.perf_counter() - clock
        for skipped in landed.files:
            if skipped.skip_reason:
                log.warning("%s: skipped, %s", skipped.name, skipped.skip_reason)

        conn.autocommit = False
        with conn.cursor() as cur, copy_conn.cursor() as copy_cur:
            file_counts = self._stage_and_merge(cur, copy_cur, landed)
            self._apply_export_files(cur, landed)
            self._quality_gate(cur, landed)

            clock = time.perf_counter()
            self.position = "while committing"
            with_rejects = {f.resource_type for f in landed.loadable if file_counts[f.file_no].rows_quarantined}
            merge.quarantine_rejected(cur, self.batch_id, landed, with_rejects)
            counts, commit_seq = mark_batch_committed(cur, self.batch_id, landed, file_counts, self.times, started)
            if self.before_commit is not None:
                self.before_commit(cur, self.batch_id)
        conn.commit()
        self.times.commit += time.perf_counter() - clock
        return committed_result(self, landed, counts, commit_seq)

    def _apply_export_files(self, cur, landed: LandedDelivery) -> None:
        """An export's deleted[] files delete by pseudonym; its error[] files are counted and recorded."""
        clock = time.perf_counter()
        if landed.of_role("deleted"):
            self.position = "while applying the export's deletions"
            apply_deletions(
                cur, self.batch_id, landed.of_role("deleted"), Tokeniser(self.keyring, id_space=self.source.id_space)
            )
        if landed.of_role("error"):
            self.position = "while recording the export's errors"
            record_export_errors(cur, self.batch_id, landed.of_role("error"))
        self.times.commit += time.perf_counter() - clock

    def _stage_and_merge(self, cur, copy_cur, landed: LandedDelivery) -> dict[int, FileCounts]:
        """Four stages at once, a spool part (or a type) apart: the workers encode the next part into a spool, a
        thread copies the previous one into staging (`copy_cur`, autocommit), the suites check each staged type
        on their own connection, and this thread merges each staged part inside the load transaction (`cur`),
        which commits or not as a whole. Both cores work and memory stays flat (spools are files)."""
        for resource_type in sorted({f.resource_type for f in landed.loadable}):
            staging.create_staging_table(copy_cur, self.batch_id, resource_type)
        file_counts = {f.file_no: FileCounts() for f in landed.loadable}
        handoff: queue.Queue = queue.Queue(maxsize=2)
        staged: queue.Queue = queue.Queue()
        stop = threading.Event()
        producer = threading.Thread(
            target=self._encode_into_spools,
            args=(landed, file_counts, landed.folder / ".spool", handoff, stop),
            name="encode",
            daemon=True,
        )
        suites = _SuiteRunner(self, landed)
        stager = threading.Thread(
            target=self._stage_spools, args=(copy_cur, landed, file_counts, handoff, staged, suites), name="stage"
        )
        producer.start()
        stager.start()
        merger = _TypeMerge(cur, self.batch_id, self.source.id_space)
        try:
            while (item := staged.get()) is not None:
                if isinstance(item, StageFailure):
                    self.position = item.position
                    raise item.error
                clock = time.perf_counter()
                self.position = f"while merging {item.resource_type}"
                if isinstance(item, _StagedPart):
                    merger.part(item)
                else:
                    for file_no, count in item.duplicates.items():
                        file_counts[file_no].rows_quarantined += count
                    offered = sum(
                        file_counts[f.file_no].rows_loaded
                        for f in landed.loadable
                        if f.resource_type == item.resource_type
                    )
                    merger.finish(item.resource_type, offered, bool(item.duplicates))
                self.times.commit += time.perf_counter() - clock
            self._after_merges(cur, landed)
            clock = time.perf_counter()
            self.outcomes = suites.results()
            self.times.suites_waited = time.perf_counter() - clock  # what the merges did not hide of the suites
            self.times.verify += self.times.suites_waited
        finally:
            stop.set()
            while producer.is_alive():
                with contextlib.suppress(queue.Empty):
                    handoff.get_nowait()
                producer.join(0.05)
            while True:  # what the stager did not take is dropped with the spool folder
                try:
                    handoff.get_nowait()
                except queue.Empty:
                    break
            handoff.put(None)  # the stager stops at the end of what it has
            stager.join()
            suites.close()
            shutil.rmtree(landed.folder / ".spool", ignore_errors=True)
        return file_counts

    def _stage_spools(self, copy_cur, landed: LandedDelivery, file_counts, handoff, staged, suites) -> None:
        """COPY each spool into a part of its type's staging table and hand the part to the merge; a type whose
        last part is staged goes to its suite and to the end of its merge."""
        last_file_of_type = {f.resource_type: f.file_no for f in landed.loadable}
        position = "while staging"
        try:
            for part_no in itertools.count():
                item = handoff.get()
                if item is None:
                    break
                if isinstance(item, StageFailure):
                    staged.put(item)
                    return
                landed_file, spool = item
                clock = time.perf_counter()
                position = f"while staging {landed_file.name}"
                part = staging.create_staging_part(copy_cur, self.batch_id, landed_file.resource_type, part_no)
                staging.copy_files(copy_cur, part, spool.files)
                reconcile_part(landed_file.name, spool.rows, copy_cur.rowcount)
                for rows_file in spool.files:
                    rows_file.unlink()
                self.times.stage += time.perf_counter() - clock
                staged.put(_StagedPart(landed_file.resource_type, part, spool.good_rows))
                if not spool.last:
                    continue
                counts = file_counts[landed_file.file_no]
                log.info("%s: %d read, %d quarantined", landed_file.name, counts.rows_read, counts.rows_quarantined)
                if last_file_of_type[landed_file.resource_type] == landed_file.file_no:
                    # the staging table is final before its suite and its merge read it: duplicates quarantined
                    position = f"while looking for duplicates in {landed_file.resource_type}"
                    table = staging.staging_table(self.batch_id, landed_file.resource_type)
                    duplicates = merge.quarantine_duplicates(copy_cur, table)
                    suites.submit(landed_file.resource_type)
                    staged.put(_TypeStaged(landed_file.resource_type, duplicates))
            staged.put(None)
        except BaseException as error:
            staged.put(StageFailure(error, position))

    def _quality_gate(self, cur, landed: LandedDelivery) -> None:
        quality_gate(cur, self.batch_id, self.source, self.outcomes, self.times.suites)

    def _after_merges(self, cur, landed: LandedDelivery) -> None:
        """Privacy steps that need the whole batch staged: person links, escrow, the k-anonymity gate."""
        has_patients = any(f.resource_type == "Patient" for f in landed.loadable)
        patients = staging.staging_table(self.batch_id, "Patient")
        clock = time.perf_counter()
        if has_patients:
            self.position = "while linking persons"
            merge.link_persons(
                cur, self.batch_id, self.source.id_space, staging.staging_table(self.batch_id, "Patient")
            )
        escrow_spool = landed.folder / ".spool" / ESCROW_SPOOL
        if escrow_spool.exists():
            self.position = "while storing the escrow"
            merge.store_escrow(cur, self.batch_id, escrow_spool)
        self.times.commit += time.perf_counter() - clock
        if has_patients:
            clock = time.perf_counter()
            self.position = "while checking k-anonymity"
            check_k_anonymity(cur, self.batch_id, patients, self.source.privacy)
            self.times.verify += time.perf_counter() - clock

    def _encode_into_spools(
        self,
        landed: LandedDelivery,
        file_counts: dict[int, FileCounts],
        spool_folder: Path,
        handoff: queue.Queue,
        stop: threading.Event,
    ) -> None:
        try:
            spool_folder.mkdir(mode=0o700)
            with (
                FileEncoder(self.keyring, self.source) as encoder,
                (spool_folder / ESCROW_SPOOL).open("wb") as escrow,
            ):
                for landed_file in landed.loadable:
                    if stop.is_set():
                        return
                    spools = self._encode_file(
                        encoder, landed_file, file_counts[landed_file.file_no], spool_folder, escrow, stop
                    )
                    for spool in spools:
                        handoff.put((landed_file, spool))
                self.times.read += encoder.read_seconds
            handoff.put(None)
        except BaseException as error:
            handoff.put(StageFailure(error, self._producer_position))

    def _encode_file(
        self,
        encoder: FileEncoder,
        landed_file: LandedFile,
        counts: FileCounts,
        spool_folder: Path,
        escrow: BinaryIO,
        stop: threading.Event,
    ) -> Iterator[_Spool]:
        """Every line read becomes one COPY row, good or rejected, so nothing read goes unaccounted. Yields spools
        of about SPOOL_BYTES of input (the files of their rows, one per worker), so that staging copies a part
        while the workers encode the next."""
        self._producer_position = f"while reading {landed_file.name}"
        chunks = encoder.encode(
            landed_file.path, landed_file.file_no, landed_file.resource_type, spool_folder, SPOOL_BYTES
        )
        spool, part, written = _Spool(), None, 0
        for number, chunk in enumerate(chunks, start=1):
            if stop.is_set():
                return
            if chunk.rows_file is None:  # encoded here, or a gzip file's lines: this process keeps the rows
                chunk_part = written // SPOOL_BYTES
                rows_file = spool_folder / f"{landed_file.file_no}.{chunk_part}.here.rows"
                with rows_file.open("ab") as handle:
                    handle.write(chunk.data)
            else:
                chunk_part, rows_file = chunk.part, Path(chunk.rows_file)
            written += chunk.size
            if part is not None and chunk_part != part:  # chunks come in file order: the previous part is whole
                spool.last = False
                yield spool
                spool = _Spool()
            part = chunk_part
            if rows_file not in spool.files:
                spool.files.append(rows_file)
            escrow.write(chunk.escrow)
            if number % 32 == 0:
                release_free_memory()
            counts.rows_read += chunk.rows_read
            counts.rows_quarantined += chunk.rows_quarantined
            spool.rows += chunk.rows_read
            spool.good_rows += chunk.rows_read - chunk.rows_quarantined
            self.times.check += chunk.check_seconds
            self.times.pseudonymise += chunk.pseudonymise_seconds
            self._producer_position = f"after {landed_file.name} line {chunk.first_line}"
            if self.progress:
                self.progress(landed_file.name, counts.rows_read, False)
        if self.progress:
            self.progress(landed_file.name, counts.rows_read, True)
        release_free_memory()
        yield spool


@dataclass
class _Spool:
    """A part of a file, encoded as COPY rows in files: its rows, the good ones among them, and whether it ends
    the file."""

    files: list[Path] = field(default_factory=list)
    rows: int = 0
    good_rows: int = 0
    last: bool = True


@dataclass(frozen=True)
class _StagedPart:
    resource_type: str
    table: str
    good_rows: int


@dataclass(frozen=True)
class _TypeStaged:
    """All of a type is staged, its duplicates quarantined (records per file number)."""

    resource_type: str
    duplicates: dict[int, int]


class _TypeMerge:
    """A type's merge, part by part as its parts are staged, under a savepoint: new ids go in as they come. When a
    part meets ids that are there already (stored by an earlier batch, or twice in this delivery), what the parts
    did is rolled back and the type is merged again at its end, as a whole, by the upsert rules. A type new to the
    warehouse gets its table without key and indexes, which are built at the type's end, after its rows. Types come
    one after the other (`LandedDelivery.loadable` keeps a type's files together)."""

    def __init__(self, cur, batch_id: str, id_space: str) -> None:
        self.cur, self.batch_id, self.id_space = cur, batch_id, id_space
        self.open_type: str | None = None
        self.table = ""
        self.only_new_ids = True
        self.new_table = False

    def part(self, staged: _StagedPart) -> None:
        if staged.resource_type != self.open_type:
            if self.open_type is not None:
                raise LoadError(f"{staged.resource_type} staged before the end of {self.open_type}")
            self.cur.execute("SAVEPOINT type_merge")
            self.open_type, self.only_new_ids = staged.resource_type, True
            created = merge.create_unindexed_table(self.cur, staged.resource_type)
            self.new_table = created is not None
            self.table = created or merge.fhir_table(self.cur, staged.resource_type)
        if self.only_new_ids:
            insert = merge.insert_all if self.new_table else merge.insert_new
            inserted = insert(self.cur, self.batch_id, self.table, staged.table, self.id_space)
            self.only_new_ids = inserted == staged.good_rows

    def finish(self, resource_type: str, offered: int, had_duplicates: bool) -> None:
        if self.open_type != resource_type:
            raise LoadError(f"{resource_type} ended before its parts were merged")
        merged = self.only_new_ids and not had_duplicates
        if merged and self.new_table:
            merged = merge.index_new_table(self.cur, self.table)
        if merged:
            self.cur.execute("RELEASE SAVEPOINT type_merge")
        else:
            self.cur.execute("ROLLBACK TO SAVEPOINT type_merge")
            self.cur.execute("RELEASE SAVEPOINT type_merge")
            merge.merge_resource_type(self.cur, self.batch_id, resource_type, self.id_space, offered)
        self.open_type = None


class _SuiteRunner:
    """The quality suites of each type, on their own connection, as soon as the type is staged: they read the
    staging tables (committed at once) and the stored patients, so PostgreSQL checks one type on one core while
    it merges the next on the other."""

    def __init__(self, loader: _BatchLoader, landed: LandedDelivery) -> None:
        self.loader = loader
        self.types = sorted({f.resource_type for f in landed.loadable})
        self.pending: queue.Queue = queue.Queue()
        self.outcomes: list = []
        self.error: BaseException | None = None
        self.thread = None
        if loader.source.quality.suites:
            self.thread = threading.Thread(target=self._run, name="suites", daemon=True)
            self.thread.start()

    def submit(self, resource_type: str) -> None:
        if self.thread is not None:
            self.pending.put(resource_type)

    def results(self) -> list:
        """Every submitted type's outcomes; an error of the runner is raised here, in the load's thread."""
        if self.thread is None:
            return []
        self.pending.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.outcomes

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.pending.put(None)
            self.thread.join(timeout=60)

    def _run(self) -> None:
        loader = self.loader
        conn = None
        try:
            conn = connect(loader.warehouse)
            conn.autocommit = True
            with conn.cursor() as cur:
                while (resource_type := self.pending.get()) is not None:
                    clock = time.perf_counter()
                    found = evaluate_batch(
                        cur,
                        loader.batch_id,
                        loader.source.name,
                        [resource_type],
                        tolerance=loader.source.quality.tolerance,
                        types_in_batch=self.types,
                    )
                    self.outcomes.extend(loader.source.quality.apply(found))
                    loader.times.suites += time.perf_counter() - clock
        except BaseException as error:  # raised again by results(), where the batch can fail cleanly
            self.error = error
            while self.pending.get() is not None:
                pass
        finally:
            if conn is not None:
                conn.close()


@dataclass(frozen=True)
class StageFailure:
    """An error of a stage thread, handed down its queue to the load transaction with where the stage was."""

    error: BaseException
    position: str


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


def mark_batch_committed(
    cur, batch_id: str, landed: LandedDelivery, file_counts: dict[int, FileCounts], times: StepTimes, started: float
) -> tuple[dict[str, TypeCounts], int]:
    """The end of every load transaction: the files recorded, the batch marked committed with its counts."""
    merge.record_files(cur, batch_id, landed, file_counts)
    counts = counts_by_type(landed, file_counts)
    totals = TypeCounts(*(sum(getattr(c, k) for c in counts.values()) for k in vars(TypeCounts())))
    commit_seq = batches.mark_committed(
        cur,
        batch_id,
        rows_read=totals.rows_read,
        rows_loaded=totals.rows_loaded,
        rows_quarantined=totals.rows_quarantined,
        input_sha256=landed.input_sha256,
        step_seconds={
            **{step: round(seconds, 4) for step, seconds in vars(times).items()},
            "elapsed": round(time.perf_counter() - started, 4),
        },
    )
    return counts, commit_seq


def committed_result(loader, landed: LandedDelivery, counts: dict[str, TypeCounts], commit_seq: int) -> BatchResult:
    return BatchResult(
        batch_id=loader.batch_id,
        source=loader.source.name,
        status="committed",
        key_id=loader.key_id,
        input_sha256=landed.input_sha256,
        counts=counts,
        skipped_files=[f.name for f in landed.files if f.skip_reason],
        elapsed=0.0,
        commit_seq=commit_seq,
        times=loader.times,
    )


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


def _failure_status(error: BaseException) -> str:
    return "rejected" if isinstance(error, BatchRejected) else "failed"


def _safe_message(error: BaseException, position: str) -> str:
    """An error message that cannot quote a record: PostgreSQL's detail and context lines are left out."""
    if isinstance(error, HealthIngestError):
        return str(error)
    pgcode = getattr(error, "pgcode", None)
    if pgcode is not None:
        diag = getattr(error, "diag", None)
        # PostgreSQL quotes input values in some primary messages: keep the words, drop the quotes
        primary = QUOTED.sub('"..."', getattr(diag, "message_primary", None) or "no message")
        return f"PostgreSQL error {pgcode} ({primary}) {position}"
    return f"{type(error).__name__} {position}"
