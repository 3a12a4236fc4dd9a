"""The FHIR loader: a delivery's NDJSON lines checked, pseudonymised and encoded as COPY rows by worker processes,
staged part by part, merged type by type into `fhir.<type>`, in the batch's one transaction (`lifecycle.run_batch`).

Four stages run at once, a spool part (or a type) apart: the workers encode the next part into a spool, a thread
copies the previous one into staging, the suites check each staged type on their own connection, and the load
transaction merges each staged part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson

from health_ingest import config
from health_ingest.batch.lifecycle import BatchContext, BatchLoader, BatchResult, StageFailure, run_batch
from health_ingest.batch.workers import SavepointMerge, Stages, WorkerPool, release_free_memory
from health_ingest.deliveries import FileCounts, LandedDelivery, LandedFile
from health_ingest.errors import DeliveryError, LoadError, MixedResourceTypes, RecordProblem
from health_ingest.formats.bounded import TOO_LONG
from health_ingest.formats.ndjson import read_lines
from health_ingest.formats.numbers import FLOAT_MARK, holds_float_mark, inexact_lines, inexact_of
from health_ingest.privacy.dates import DateShifter
from health_ingest.privacy.escrow import EscrowCipher, encode_escrow_rows
from health_ingest.privacy.gate import check_k_anonymity
from health_ingest.privacy.keyring import Keyring
from health_ingest.privacy.resources import ResourcePseudonymiser
from health_ingest.privacy.tokens import Tokeniser
from health_ingest.quality.checks import (
    MIXED_TYPES,
    TOO_DEEP,
    Rejection,
    check_exact_line,
    check_line,
    last_updated,
)
from health_ingest.quality.reconcile import reconcile_part
from health_ingest.quality.strict import StrictRules, strict_check
from health_ingest.quality.suites import evaluate_batch, quality_gate
from health_ingest.sources.landing import land_fhir_delivery
from health_ingest.sources.registry import Source
from health_ingest.warehouse import batches, merge, staging
from health_ingest.warehouse.connection import connect
from health_ingest.warehouse.deletions import apply_deletions, record_export_errors
from health_ingest.warehouse.staging import encode_loaded, encode_rejected

log = logging.getLogger(__name__)

ESCROW_SPOOL = "escrow.copy"
SPOOLS = ".spool"  # the spools' folder, in the landing folder
SPOOL_BYTES = 16 << 20  # a file's spool is staged in parts of about this size, while the workers encode the next
CHUNK_LINES = 2000
CHUNK_BYTES = 1 << 19  # about 512 KiB of raw lines


def run_fhir_batch(delivery: Path, source: Source, **options) -> BatchResult:
    """Load one FHIR delivery as one batch: all of it commits, or nothing does and the batch is marked failed.
    `options` are `run_batch`'s: `url`, `keyring`, `progress`, and `before_commit`, which runs inside the load
    transaction (a pulled export's next `_since` moves there)."""
    return run_batch(delivery, source, "fhir", FhirLoader, **options)


class FhirLoader(BatchLoader):
    """The load transaction of one FHIR batch (a `lifecycle.Loader`)."""

    def __init__(self, context: BatchContext) -> None:
        super().__init__(context)
        self._producer_position = "while reading the delivery"
        # what the pseudonymiser removed, by reason then element (`ingest.batches.privacy_removed`)
        self.privacy_removed: dict[str, dict[str, int]] = {}
        self.outcomes: list = []  # the quality suites' results, gathered type by type
        self.strict_warnings: Counter = Counter()  # strict validation's warnings, by rule: counted, not quarantined

    def load(self, conn, copy_conn, delivery: Path) -> BatchResult:
        """`copy_conn` stages (autocommit); `conn` holds the load transaction that merges and commits."""
        clock = started = time.perf_counter()
        landed = land_fhir_delivery(delivery, self.landing)
        self.times.land = time.perf_counter() - clock
        for skipped in landed.files:
            if skipped.skip_reason:
                log.warning("%s: skipped, %s", skipped.name, skipped.skip_reason)

        conn.autocommit = False
        with conn.cursor() as cur, copy_conn.cursor() as copy_cur:
            file_counts = self._stage_and_merge(cur, copy_cur, landed)
            self.check_ceiling(landed, file_counts)
            self._apply_export_files(cur, landed)
            self._quality_gate(cur, landed)

            clock = time.perf_counter()
            self.position = "while committing"
            with_rejects = {f.resource_type for f in landed.loadable if file_counts[f.file_no].rows_quarantined}
            merge.quarantine_rejected(cur, self.batch_id, landed, with_rejects)
            result = self.commit(cur, landed, file_counts, started)
        conn.commit()
        self.times.commit += time.perf_counter() - clock
        if self.strict_warnings:
            result.strict_warnings = dict(sorted(self.strict_warnings.items()))
            log.info("strict validation: warnings by rule %s", result.strict_warnings)
        return result

    def warehouse_table(self, name: str) -> str:
        return f"fhir.{name.lower()}"

    @staticmethod
    def remove_spools(folder: Path) -> None:
        shutil.rmtree(folder / SPOOLS, ignore_errors=True)

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
        types = sorted({f.resource_type for f in landed.loadable})
        self.position = "while waiting for a table another batch is creating"
        batches.lock_new_tables(cur, [f"fhir.{t.lower()}" for t in types])
        for resource_type in types:
            staging.create_staging_table(copy_cur, self.batch_id, resource_type)
        file_counts = self.file_counts = {f.file_no: FileCounts() for f in landed.loadable}
        stages = Stages()
        handoff: queue.Queue = queue.Queue(maxsize=2)
        staged: queue.Queue = queue.Queue()
        suites = _SuiteRunner(self, landed)
        stages.start("encode", self._encode_into_spools, landed, file_counts, landed.folder / SPOOLS, handoff, stages)
        stages.start("stage", self._stage_spools, copy_cur, landed, file_counts, handoff, staged, suites, stages)
        merger = _TypeMerge(cur, self.batch_id, self.source.id_space)
        try:
            while (item := stages.next(staged)) is not None:
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
                        file_counts[file_no].rows_superseded += count
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
            stages.close()  # what the stager did not take is dropped with the spool folder
            suites.close()
            self.remove_spools(landed.folder)
        return file_counts

    def _stage_spools(
        self, copy_cur, landed: LandedDelivery, file_counts, handoff, staged, suites, stages: Stages
    ) -> None:
        """COPY each spool into a part of its type's staging table and hand the part to the merge; a type whose
        last part is staged goes to its suite and to the end of its merge."""
        last_file_of_type = {f.resource_type: f.file_no for f in landed.loadable}
        position = "while staging"
        try:
            for part_no in itertools.count():
                item = stages.next(handoff)
                if item is None:
                    break
                if isinstance(item, StageFailure):
                    stages.put(staged, item)
                    return
                landed_file, spool = item.landed_file, item.spool
                clock = time.perf_counter()
                position = f"while staging {landed_file.name}"
                part = staging.create_staging_part(copy_cur, self.batch_id, landed_file.resource_type, part_no)
                staging.copy_files(copy_cur, part, spool.files)
                reconcile_part(landed_file.name, spool.rows, copy_cur.rowcount)
                for rows_file in spool.files:
                    rows_file.unlink()
                self.times.stage += time.perf_counter() - clock
                stages.put(staged, _StagedPart(landed_file.resource_type, part, spool.good_rows))
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
                    stages.put(staged, _TypeStaged(landed_file.resource_type, duplicates))
            stages.put(staged, None)
        except BaseException as error:
            stages.put(staged, StageFailure(error, position))

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
        escrow_spool = landed.folder / SPOOLS / ESCROW_SPOOL
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
        stages: Stages,
    ) -> None:
        try:
            spool_folder.mkdir(mode=0o700)
            with (
                FileEncoder(self.keyring, self.source) as encoder,
                (spool_folder / ESCROW_SPOOL).open("wb") as escrow,
            ):
                for landed_file in landed.loadable:
                    if stages.stop.is_set():
                        return
                    spools = self._encode_file(
                        encoder, landed_file, file_counts[landed_file.file_no], spool_folder, escrow, stages.stop
                    )
                    for spool in spools:
                        if not stages.put(handoff, _SpoolReady(landed_file, spool)):
                            return
                self.times.read += encoder.read_seconds
            stages.put(handoff, None)
        except BaseException as error:
            stages.put(handoff, StageFailure(error, self._producer_position))

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
        try:
            yield from self._spools_of(landed_file, chunks, counts, spool_folder, escrow, stop)
        except MixedResourceTypes as error:
            raise DeliveryError(
                f"{landed_file.name}: {error}; a file holds one resource type, nothing of the delivery was loaded"
            ) from None

    def _spools_of(self, landed_file, chunks, counts, spool_folder, escrow, stop) -> Iterator[_Spool]:
        """The file's encoded chunks gathered into spools (see `_encode_file`)."""
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
            self.strict_warnings.update(dict(chunk.strict_warnings))
            self.times.pseudonymise += chunk.pseudonymise_seconds
            for (reason, element), removed in chunk.removed.items():
                by_element = self.privacy_removed.setdefault(reason, {})
                by_element[element] = by_element.get(element, 0) + removed
            self._producer_position = f"after {landed_file.name} line {chunk.first_line}"
            if self.progress:
                self.progress(landed_file.name, counts.rows_read, False)
        if self.progress:
            self.progress(landed_file.name, counts.rows_read, True)
        release_free_memory()
        yield spool


# --- implementation details -------------------------------------------------------------------


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


@dataclass(frozen=True)
class _SpoolReady:
    """A spool of a file, encoded, for the stager to copy."""

    landed_file: LandedFile
    spool: _Spool


class _TypeMerge:
    """A type's merge, part by part as its parts are staged, under a savepoint (`workers.SavepointMerge`): new ids
    go in as they come. When a part meets ids that are there already (stored by an earlier batch, or twice in this
    delivery), what the parts did is rolled back and the type is merged again at its end, as a whole, by the upsert
    rules. Types come one after the other (`LandedDelivery.loadable` keeps a type's files together)."""

    def __init__(self, cur, batch_id: str, id_space: str) -> None:
        self.cur, self.batch_id, self.id_space = cur, batch_id, id_space
        self.open_type: str | None = None
        self.table = ""
        self.savepoint: SavepointMerge | None = None

    def part(self, staged: _StagedPart) -> None:
        if staged.resource_type != self.open_type:
            if self.open_type is not None:
                raise LoadError(f"{staged.resource_type} staged before the end of {self.open_type}")
            self.open_type = staged.resource_type
            self.savepoint = SavepointMerge(self.cur, "type_merge")
            created = merge.create_unindexed_table(self.cur, staged.resource_type)
            self.savepoint.unindexed = created is not None
            self.table = created or merge.fhir_table(self.cur, staged.resource_type)
        if self.savepoint.inserting:
            insert = merge.insert_all if self.savepoint.unindexed else merge.insert_new
            inserted = insert(self.cur, self.batch_id, self.table, staged.table, self.id_space)
            self.savepoint.inserting = inserted == staged.good_rows

    def finish(self, resource_type: str, offered: int, had_duplicates: bool) -> None:
        if self.open_type != resource_type:
            raise LoadError(f"{resource_type} ended before its parts were merged")
        cur, batch_id, id_space = self.cur, self.batch_id, self.id_space
        self.savepoint.finish(
            self.savepoint.inserting and not had_duplicates,
            build_key=lambda: merge.index_new_table(cur, self.table),
            merge_whole=lambda: merge.merge_resource_type(cur, batch_id, resource_type, id_space, offered),
        )
        self.open_type = None


class _SuiteRunner:
    """The quality suites of each type, on their own connection, as soon as the type is staged: they read the
    staging tables (committed at once) and the stored patients, so PostgreSQL checks one type on one core while
    it merges the next on the other."""

    def __init__(self, loader: FhirLoader, landed: LandedDelivery) -> None:
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


# --- the encoder: check, pseudonymise and encode lines as COPY rows, in chunks, on every core ------------


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """COPY rows for a run of lines, good and rejected alike, with what the worker counted and spent."""

    data: bytes  # the rows, unless a worker wrote them to `rows_file`
    escrow: bytes  # COPY rows for the escrow, when the source keeps one
    rows_read: int
    rows_quarantined: int
    first_line: int
    check_seconds: float
    pseudonymise_seconds: float
    size: int = 0  # bytes of rows
    rows_file: str | None = None  # where a worker appended the rows, with the other chunks of its `part`
    part: int = 0
    strict_warnings: tuple[tuple[str, int], ...] = ()  # strict validation's warnings in the chunk, by rule
    # what the pseudonymiser removed from the chunk's resources: (reason, `Type.element`) -> how many
    removed: dict[tuple[str, str], int] = field(default_factory=dict)


class ChunkEncoder:
    def __init__(
        self,
        pseudonymiser: ResourcePseudonymiser,
        escrow: EscrowCipher | None = None,
        *,
        strict: bool = False,
        rules: StrictRules | None = None,
    ) -> None:
        self._strict = strict
        self._rules = rules or StrictRules()
        self._allow_comments = strict and self._rules.allow_comments
        self.pseudonymiser = pseudonymiser
        self._pseudonymise = pseudonymiser.pseudonymise
        self._tokens = pseudonymiser.tokens
        self._escrow = escrow

    def encode(
        self, file_no: int, expected_type: str, lines: list[tuple[int, bytes]], exact: frozenset[int] = frozenset()
    ) -> EncodedChunk:
        """`exact`: the lines whose numbers a float would alter (`inexact_lines`), parsed keeping them as written;
        a line whose row shows a float of 1e16 or more (`FLOAT_MARK`: an integer beyond 64 bits, an exponent) is
        encoded again exactly. A record that cannot be pseudonymised or written (an identifier system that is not
        a string, nesting too deep for the JSON writer) is quarantined like one that fails its checks."""
        warnings: Counter = Counter()
        rows, rejected, check_seconds, pseudonymise_seconds = self._encode_lines(
            file_no, expected_type, lines, exact, warnings
        )
        data = b"".join(rows)
        if holds_float_mark(data):  # rare: one test of the chunk, then of its rows
            for index, row in enumerate(rows):
                if FLOAT_MARK in row and lines[index][0] not in exact:
                    again, rejected_again, *_ = self._encode_lines(
                        file_no, expected_type, [lines[index]], frozenset({lines[index][0]}), Counter()
                    )
                    rows[index] = again[0]
                    rejected += rejected_again
            data = b"".join(rows)
        escrow = encode_escrow_rows(self._escrow, self._tokens.drain_new_tokens()) if self._escrow else b""
        return EncodedChunk(
            data,
            escrow,
            len(lines),
            rejected,
            lines[0][0] if lines else 0,
            check_seconds,
            pseudonymise_seconds,
            len(data),
            strict_warnings=tuple(warnings.items()),
            removed=self.pseudonymiser.take_removed(),
        )

    def _encode_lines(
        self,
        file_no: int,
        expected_type: str,
        lines: list[tuple[int, bytes]],
        exact: frozenset[int],
        warnings: Counter,
    ) -> tuple[list[bytes], int, float, float]:
        rows, rejected = [], 0
        pseudonymise, dumps, clock = self._pseudonymise, orjson.dumps, time.perf_counter
        check_seconds = pseudonymise_seconds = 0.0
        strict, rules, allow_comments = self._strict, self._rules, self._allow_comments
        for line_no, raw in lines:
            t0 = clock()
            if exact and line_no in exact:
                checked = check_exact_line(raw, expected_type, allow_comments=allow_comments)
            else:
                checked = check_line(raw, expected_type, allow_comments=allow_comments)
            if strict and type(checked) is not Rejection:
                outcome = strict_check(checked, rules)
                warnings.update(outcome.warnings)
                checked = outcome.rejection or checked
            t1 = clock()
            check_seconds += t1 - t0
            if type(checked) is not Rejection:
                updated = last_updated(checked)
                try:
                    ids = pseudonymise(checked)
                    rows.append(
                        encode_loaded(file_no, line_no, ids.resource_id, ids.patient_id, updated, dumps(checked))
                    )
                    pseudonymise_seconds += clock() - t1
                    continue
                except RecordProblem as problem:
                    checked = Rejection(problem.reason, problem.message)
                except (orjson.JSONEncodeError, RecursionError):
                    checked = TOO_DEEP
            if checked.reason == MIXED_TYPES:
                raise MixedResourceTypes(f"line {line_no}: {checked.message}")
            rejected += 1
            rows.append(encode_rejected(file_no, line_no, checked.reason, checked.message))
        return rows, rejected, check_seconds, pseudonymise_seconds


class FileEncoder(WorkerPool):
    """Encodes whole files chunk by chunk, in worker processes when there is more than one core; chunks come back
    in file order. Use as a context manager: the workers stop with it."""

    def __init__(self, keyring: Keyring, source: Source, workers: int | None = None) -> None:
        super().__init__(_start_worker, (keyring, source), workers)
        self.read_seconds = 0.0
        self.limits = config.read_limits()
        self._local = None if self.workers > 1 else chunk_encoder(keyring, source)

    def encode(
        self,
        path: Path,
        file_no: int,
        expected_type: str,
        rows_folder: Path | None = None,
        part_bytes: int | None = None,
    ) -> Iterator[EncodedChunk]:
        """Chunks of the file, encoded, in file order. Workers read the byte ranges of a plain file themselves;
        when `rows_folder` is given, each appends its chunks' rows to a file of its own per part (`part_bytes`
        of the input; None: the whole file): neither the raw lines nor the rows pass through this process (a
        gzip file, which cannot be read at an offset, is sent to them line by line and its rows come back)."""
        # the file's reader is closed as soon as its encoding ends, by an error too: a failed batch's traceback
        # would otherwise keep the landing copy open, and its space taken after it is removed
        if not self.parallel:
            with contextlib.closing(self._chunks(path)) as chunks:
                for lines in chunks:
                    yield self._local.encode(file_no, expected_type, lines, inexact_of(lines))
            return
        if not path.name.lower().endswith(".gz"):
            reader = self._ranges(path)
            tasks = (
                (
                    _encode_range_in_worker,
                    str(path),
                    start,
                    end,
                    first_line,
                    file_no,
                    expected_type,
                    str(rows_folder) if rows_folder else None,
                    start // part_bytes if part_bytes else 0,
                    too_long,
                )
                for start, end, first_line, too_long in reader
            )
        else:
            reader = self._chunks(path)
            tasks = ((_encode_in_worker, file_no, expected_type, lines) for lines in reader)
        with contextlib.closing(reader):
            yield from self.in_order(tasks)

    def _ranges(self, path: Path) -> Iterator[tuple[int, int, int, bool]]:
        """(start, end, first line number, too long) of runs of whole lines of about CHUNK_BYTES; one reused buffer
        counts the newlines, so that line numbers stay exact. A line over the length limit is a run of its own,
        marked too long, which no process reads: it is only skipped here, a megabyte at a time."""
        clock = time.perf_counter
        buffer = bytearray(CHUNK_BYTES)
        max_line = self.limits.line_bytes
        with path.open("rb") as handle:
            offset, line = 0, 1
            while True:
                started = clock()
                read = handle.readinto(buffer)
                if not read:
                    return
                rest = handle.readline(max_line + 1) if read == CHUNK_BYTES else b""  # to the end of the line cut
                if len(rest) > max_line and not rest.endswith(b"\n"):
                    cut = buffer.rfind(b"\n", 0, read) + 1  # where the long line starts
                    while (more := handle.readline(1 << 20)) and not more.endswith(b"\n"):
                        pass
                    end = handle.tell()
                    self.read_seconds += clock() - started
                    if cut:
                        yield offset, offset + cut, line, False
                        line += buffer.count(b"\n", 0, cut)
                    yield offset + cut, end, line, True
                    offset, line = end, line + 1
                    continue
                newlines = buffer.count(b"\n", 0, read) + rest.count(b"\n")
                self.read_seconds += clock() - started
                end = offset + read + len(rest)
                yield offset, end, line, False
                offset, line = end, line + newlines

    def _chunks(self, path: Path) -> Iterator[list[tuple[int, bytes]]]:
        """Chunks of at most CHUNK_LINES lines and about CHUNK_BYTES: large resources (notes, bundles) make
        fewer lines per chunk, so that memory in flight does not depend on what the file holds."""
        clock = time.perf_counter
        started = clock()
        chunk: list[tuple[int, bytes]] = []
        size = 0
        for entry in read_lines(path, limits=self.limits):
            chunk.append(entry)
            size += len(entry[1])
            if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
                self.read_seconds += clock() - started
                yield chunk
                started = clock()
                chunk, size = [], 0
        self.read_seconds += clock() - started
        if chunk:
            yield chunk


# --- the encoding workers' side ----------------------------------------------------------------

_worker: ChunkEncoder | None = None


def chunk_encoder(keyring: Keyring, source: Source) -> ChunkEncoder:
    """The per-process encoder for a source: its id space, its privacy policy, its escrow."""
    policy = source.privacy
    tokeniser = Tokeniser(keyring, id_space=source.id_space, record_new=policy.escrow)
    shifter = DateShifter(keyring, policy.date_shift_days) if policy.date_shift_days else None
    pseudonymiser = ResourcePseudonymiser(tokeniser, policy, date_shifter=shifter)
    escrow = EscrowCipher(keyring) if policy.escrow else None
    return ChunkEncoder(pseudonymiser, escrow, strict=source.quality.strict, rules=source.quality.strict_rules)


def _start_worker(keyring: Keyring, source: Source) -> None:
    global _worker
    _worker = chunk_encoder(keyring, source)


def _encode_in_worker(file_no: int, expected_type: str, lines: list[tuple[int, bytes]]) -> EncodedChunk:
    return _worker.encode(file_no, expected_type, lines, inexact_of(lines))


def _encode_range_in_worker(
    path: str,
    start: int,
    end: int,
    first_line: int,
    file_no: int,
    expected_type: str,
    rows_folder: str | None,
    part: int,
    too_long: bool = False,
) -> EncodedChunk:
    """Read a run of whole lines of the file and encode them; the rows are appended to this worker's file of the
    part when there is a folder for them. A line too long is not read: it is quarantined as such."""
    if too_long:
        chunk = _worker.encode(file_no, expected_type, [(first_line, TOO_LONG)])
    else:
        chunk = _worker.encode(file_no, expected_type, *lines_of_range(path, start, end, first_line))
    if rows_folder is None:
        return chunk
    rows_file = f"{rows_folder}/{file_no}.{part}.{os.getpid()}.rows"
    with open(rows_file, "ab") as handle:
        handle.write(chunk.data)
    return dataclasses.replace(chunk, data=b"", rows_file=rows_file, part=part)


def lines_of_range(
    path: str | Path, start: int, end: int, first_line: int
) -> tuple[list[tuple[int, bytes]], frozenset[int]]:
    """(line number, raw bytes) of the non-blank lines of a byte range that starts and ends at line breaks, and the
    numbers of those whose numbers must be parsed exactly (one scan of the whole range)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    lines = [(number, raw) for number, raw in enumerate(data.split(b"\n"), start=first_line) if raw.strip()]
    return lines, inexact_lines(data, first_line)
