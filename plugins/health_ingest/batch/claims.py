"""The claims loader: land, check every header, read, pseudonymise, stage, type, verify, commit, in the batch's one
transaction (`lifecycle.run_batch`).

Four stages run at once, a chunk apart: worker processes read and pseudonymise the files into spools in COPY's text
format (the reader, below), a thread copies each chunk's usual rows straight into typed columns and its other rows
into text staging, a third connection types the staged rows and counts the suites on each chunk, and the load
transaction merges each typed chunk.

A plain file is read in byte ranges of whole lines by the workers, as the FHIR loader reads NDJSON, for as long as
no quote can hide a line break in a field; the rest of such a file, and a compressed one, is read here, in order.
"""

from __future__ import annotations

import codecs
import itertools
import logging
import os
import queue
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from health_ingest.batch.lifecycle import BatchContext, BatchLoader, BatchResult, StageFailure, run_batch
from health_ingest.batch.workers import SavepointMerge, Stages, WorkerPool
from health_ingest.deliveries import FileCounts, LandedFile
from health_ingest.errors import DeliveryError, LoadError
from health_ingest.formats.claims import (
    ASCII_COMPATIBLE,
    ClaimsProfile,
    LineRanges,
    is_claims_file,
    load_profile,
    open_claims_file,
    rows_of_range,
)
from health_ingest.privacy.claims import ColumnPlan, RowTransform, plan_columns, row_digest
from health_ingest.privacy.keyring import Keyring
from health_ingest.privacy.tokens import Tokeniser
from health_ingest.quality.suites import (
    count_chunk,
    counts_by_chunk,
    evaluate_tables,
    load_table_suites,
    quality_gate,
)
from health_ingest.sources.landing import land_files
from health_ingest.sources.registry import Source
from health_ingest.warehouse import batches, claims_tables
from health_ingest.warehouse.claims_tables import native_row_test
from health_ingest.warehouse.connection import connect
from health_ingest.warehouse.staging import copy_files, escape_text

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2  # chunks waiting between two stages (spools on disk, staged chunks in PostgreSQL)


def run_claims_batch(delivery: Path, source: Source, **options) -> BatchResult:
    """Load one claims delivery (CSV, pipe-delimited, gzip or zip files) with the source's format profile;
    `options` are `run_batch`'s."""
    return run_batch(delivery, source, "claims", ClaimsLoader, **options)


class ClaimsLoader(BatchLoader):
    """The load transaction of one claims batch (a `lifecycle.Loader`)."""

    def __init__(self, context: BatchContext) -> None:
        super().__init__(context)
        self.profile: ClaimsProfile = load_profile(self.source.format)
        self.stage_positions = {"read": "while reading the delivery", "copy": "while staging", "type": "while typing"}
        self.suites_run: set[str] = set()
        self.file_names: dict[int, str] = {}  # by file number, for the quarantine
        self.routes: dict[str, Counter] = {}  # by table: rows copied as typed, rows typed from text, chunks retyped
        self.suite_counts: dict[str, list[int]] = {}  # by warehouse table: its suite's counts, summed chunk by chunk

    def load(self, conn, copy_conn, delivery: Path) -> BatchResult:
        started = clock = time.perf_counter()
        landing = self.landing
        landed = land_files(delivery, landing, is_claims_file, self._table_of, what="claims file (*.csv, *.csv.gz)")
        self.times.land = time.perf_counter() - clock
        self.position = "while checking the headers"
        plans = {f.file_no: self._plan(f) for f in landed.loadable}  # every header, before anything is written

        conn.autocommit = False
        file_counts = self.file_counts = {f.file_no: FileCounts() for f in landed.loadable}
        self.file_names = {f.file_no: f.name for f in landed.loadable}
        tables = self._in_dependency_order(sorted({f.resource_type for f in landed.loadable}))
        files_of = {table: [f for f in landed.loadable if f.resource_type == table] for table in tables}
        for table in tables:
            claims_tables.check_columns(table, plans[files_of[table][0].file_no].columns)
        with conn.cursor() as cur:
            self.position = "while waiting for a table another batch is creating"
            batches.lock_new_tables(cur, [f"claims.{self.profile.warehouse_table(t)}" for t in tables])
        typing_conn = connect(self.warehouse)
        typing_conn.autocommit = True
        stages = Stages()
        spools, staged, typed = (queue.Queue(QUEUE_DEPTH), queue.Queue(QUEUE_DEPTH), queue.Queue())
        outcomes = []
        try:
            stages.start("read", self._read_files, tables, files_of, plans, file_counts, spools, stages)
            stages.start("copy", self._copy_chunks, copy_conn, plans, spools, staged, stages)
            stages.start("type", self._type_chunks, typing_conn, files_of, plans, staged, typed, stages)
            with conn.cursor() as cur:
                merges: dict[str, _TableMerge] = {}
                finished: list[str] = []
                while (item := stages.next(typed)) is not None:
                    if isinstance(item, StageFailure):
                        self.position = item.position
                        raise item.error
                    if isinstance(item, _ChunkSuite):
                        self._add_suite_counts(cur, item, merges[item.table], tables, finished)
                        continue
                    table = item.table
                    if isinstance(item, _TypedChunk):
                        plan = plans[files_of[table][0].file_no].columns
                        self._merge_chunk(cur, table, item.chunk, item.counts, merges, plan)
                        continue
                    self._finish_table(cur, table, merges.pop(table), files_of[table], file_counts)
                    finished.append(table)
                    for ready in self._suites_ready(tables, finished):
                        outcomes += self._suite(cur, ready)
                self.check_ceiling(landed, file_counts)
                clock = time.perf_counter()
                self.position = "while running the quality suites"
                quality_gate(cur, self.batch_id, self.source, outcomes, self.times.suites)
                self.times.verify += time.perf_counter() - clock
                clock = time.perf_counter()
                self.position = "while committing"
                result = self.commit(cur, landed, file_counts, started)
            conn.commit()
            self.times.commit += time.perf_counter() - clock
        finally:
            stages.close()
            typing_conn.close()
            remove_spools(landing)
        return result

    def warehouse_table(self, name: str) -> str:
        return f"claims.{self.profile.warehouse_table(name)}"

    @staticmethod
    def remove_spools(folder: Path) -> None:
        remove_spools(folder)

    # --- the stages, each in its own thread; an error travels down the queues to the load transaction ---------

    def _read_files(self, tables, files_of, plans, file_counts, spools: queue.Queue, stages: Stages) -> None:
        """Each file into chunks of about `CHUNK_BYTES` of input; then the table's end."""
        stop = stages.stop
        try:
            with ClaimsReader(self.keyring, self.source.id_space) as reader:
                for table in tables:
                    chunk_no = 0
                    for landed_file in files_of[table]:
                        self.stage_positions["read"] = f"while reading {landed_file.name}"
                        counts = file_counts[landed_file.file_no]
                        plan = plans[landed_file.file_no]
                        for chunk in reader.chunks(landed_file.path, landed_file.name, plan, stop):
                            counts.rows_read += chunk.rows_read
                            counts.rows_quarantined += chunk.wrong_width
                            self.times.pseudonymise += chunk.seconds
                            if self.progress:
                                self.progress(landed_file.name, counts.rows_read, False)
                            if not stages.put(spools, _ReadChunk(table, chunk_no, landed_file, chunk)):
                                return
                            chunk_no += 1
                        if stop.is_set():
                            return
                        log.info("%s: %d rows read", landed_file.name, counts.rows_read)
                        if self.progress:
                            self.progress(landed_file.name, counts.rows_read, True)
                    stages.put(spools, _TableEnd(table))
            stages.put(spools, None)
        except BaseException as error:
            stages.put(spools, StageFailure(error, self.stage_positions["read"]))

    def _copy_chunks(self, copy_conn, plans, spools: queue.Queue, staged: queue.Queue, stages: Stages) -> None:
        """Each chunk's native spools straight into its typed chunk, and its careful spools into a text staging
        table (autocommit); native spools that do not fit their types (an overflow, 31 February) are staged as text
        too, so that the careful casts quarantine what fails. The spools are then removed."""
        try:
            with copy_conn.cursor() as cur:
                while (item := stages.next(spools)) is not None:
                    if isinstance(item, _ReadChunk):
                        clock = time.perf_counter()
                        self.stage_positions["copy"] = f"while staging {item.landed_file.name}"
                        plan = plans[item.landed_file.file_no]
                        item = self._copy_chunk(cur, item.table, item.chunk_no, plan, item.chunk)
                        self.times.stage += time.perf_counter() - clock
                    if not stages.put(staged, item) or isinstance(item, StageFailure):
                        return
            stages.put(staged, None)
        except BaseException as error:
            stages.put(staged, StageFailure(error, self.stage_positions["copy"]))

    def _copy_chunk(self, cur, table: str, chunk_no: int, plan: FilePlan, chunk: Chunk) -> _CopiedChunk:
        """The typed chunk, and its text staging (None when every row was copied as typed)."""
        name = f"{claims_tables.staging_name(self.batch_id, table)}_{chunk_no}"
        typed_name = claims_tables.create_typed(cur, f"{name}_typed", self.profile.tables[table], plan.columns)
        routes = self.routes.setdefault(table, Counter())
        as_text = list(chunk.careful) if chunk.careful_rows else []
        copied = 0
        try:
            if chunk.native_rows:
                copy_files(cur, typed_name, chunk.native, columns=None, options=COPY_OPTIONS)
            copied = chunk.native_rows
        except psycopg2.DataError:  # the message would quote the value: only the fact is kept
            as_text = chunk.native + as_text
            routes["chunks typed again from text"] += 1
        routes["copied as typed"] += copied
        routes["typed from text"] += chunk.rows_read - copied
        text_name = None
        if as_text:
            text_name = claims_tables.create_staging(cur, name, plan.columns)
            copy_files(cur, text_name, as_text, columns=None, options=COPY_OPTIONS)
        for spool in chunk.native + chunk.careful:
            spool.unlink(missing_ok=True)
        return _CopiedChunk(table, typed_name, text_name)

    def _type_chunks(
        self, typing_conn, files_of, plans, staged: queue.Queue, typed: queue.Queue, stages: Stages
    ) -> None:
        """Each chunk's text staging (if any) cast into its typed chunk (autocommit), then dropped, and the typed
        chunk's good and bad rows counted per file; then its suite counted, while the load transaction merges it;
        the table's end passed on."""
        try:
            with typing_conn.cursor() as cur:
                while (item := stages.next(staged)) is not None:
                    if not isinstance(item, _CopiedChunk):  # a table's end, or a failure
                        if not stages.put(typed, item) or isinstance(item, StageFailure):
                            return
                        continue
                    table, typed_name, text_name = item.table, item.typed, item.text
                    clock = time.perf_counter()
                    self.stage_positions["type"] = f"while typing {table}"
                    if text_name is not None:
                        plan = plans[files_of[table][0].file_no].columns
                        claims_tables.type_staged(cur, text_name, typed_name, self.profile.tables[table], plan)
                        cur.execute(f"DROP TABLE {text_name}")
                    counts = claims_tables.staged_counts(cur, typed_name)
                    self.times.check += time.perf_counter() - clock
                    stages.put(typed, _TypedChunk(table, typed_name, counts))
                    suite = self._count_suite(cur, table, typed_name, in_load=False)
                    stages.put(typed, _ChunkSuite(table, typed_name, suite))
            stages.put(typed, None)
        except BaseException as error:
            stages.put(typed, StageFailure(error, self.stage_positions["type"]))

    def _count_suite(self, cur, table: str, chunk: str, *, in_load: bool) -> list[int] | None:
        """The table suite's counts over a typed chunk, when they can be summed, in two parts (`count_chunk`):
        beside the load transaction (on the typing connection) those of the columns that read each row alone, and
        in it (`in_load`, the chunk merged) those of the columns that also read a table the batch has finished
        merging (its header table). The load transaction, which the batch waits for, counts only the latter."""
        warehouse_table = self.warehouse_table(table)
        if not self.source.quality.suites or not counts_by_chunk(warehouse_table):
            return None
        clock = time.perf_counter()
        position = f"while running the quality suite of {table}"
        if in_load:
            self.position = position
        else:
            self.stage_positions["type"] = position
        counts = count_chunk(cur, warehouse_table, chunk, other_tables=in_load)
        seconds = time.perf_counter() - clock
        self.times.suites += seconds
        if in_load:
            self.times.verify += seconds
        return counts

    # --- in the load transaction -------------------------------------------------------------------------------

    def _add_suite_counts(self, cur, counted: _ChunkSuite, merge: _TableMerge, tables, finished) -> None:
        """A merged chunk's suite counts, counted beside the load, and those that only the load transaction can
        count (its header check) once the header table is merged; else the suite reads the table at its end."""
        merge.add_suite_counts(counted.counts)
        required = self._required_by_suite(counted.table)
        if counted.counts is None or not required:
            return
        pending = {self.warehouse_table(t) for t in tables if t not in finished}
        merge.add_suite_counts(
            None if required & pending else self._count_suite(cur, counted.table, counted.chunk, in_load=True)
        )

    def _merge_chunk(self, cur, table: str, chunk: str, staged_counts, merges: dict, plan) -> None:
        """A typed chunk into the warehouse table as soon as it is typed, its bad rows (if any) into the
        quarantine. While every key is new, chunks are plainly inserted; the first key met again rolls the table
        back to its savepoint, and its chunks, this one and the next, are merged by key."""
        clock = time.perf_counter()
        self.position = f"while merging {table}"
        warehouse_table = self.profile.warehouse_table(table)
        merge = merges.get(table)
        if merge is None:
            unindexed = claims_tables.ensure_table(cur, warehouse_table, self.profile.tables[table], plan)
            merge = merges[table] = _TableMerge(plan, SavepointMerge(cur, "merge_table", unindexed=unindexed))
        written = None
        if merge.savepoint.inserting:
            written = claims_tables.insert_chunk(
                cur, chunk, warehouse_table, self.profile.tables[table], plan, self.batch_id, self.source.name
            )
            if written is None:
                merge.savepoint.undo()
                earlier = merge.restart_by_key()
                for earlier_chunk, earlier_counts in earlier:
                    self._merge_by_key(cur, table, earlier_chunk, earlier_counts, merge)
        if written is None:
            self._merge_by_key(cur, table, chunk, staged_counts, merge)
        else:
            merge.add(chunk, written, staged_counts)
            self._quarantine_bad(cur, chunk, staged_counts)
        self.times.commit += time.perf_counter() - clock

    def _merge_by_key(self, cur, table: str, chunk: str, staged_counts, merge: _TableMerge) -> None:
        offered = sum(good for good, _ in staged_counts.values())
        written = claims_tables.merge_chunk(
            cur,
            chunk,
            offered,
            self.profile.warehouse_table(table),
            self.profile.tables[table],
            merge.plan,
            self.batch_id,
            self.source.name,
        )
        merge.add(chunk, written, staged_counts)
        self._quarantine_bad(cur, chunk, staged_counts)

    def _quarantine_bad(self, cur, chunk: str, staged_counts) -> None:
        if any(bad for _, bad in staged_counts.values()):
            claims_tables.quarantine_rows(cur, chunk, self.batch_id, self.file_names)

    def _finish_table(self, cur, table: str, merge: _TableMerge, files: list[LandedFile], file_counts) -> None:
        """Reconcile the table's counts. When a key came twice in the batch (in one chunk or chunks apart), the
        chunks' writes are undone and the table merged again as one, so that the last row is kept and the earlier
        quarantined."""
        clock = time.perf_counter()
        self.position = f"while merging {table}"
        warehouse_table, schema = self.profile.warehouse_table(table), self.profile.tables[table]
        chunks, savepoint = merge, merge.savepoint
        superseded: dict[int, int] = {}

        def merge_whole() -> None:
            nonlocal merge
            log.info("%s: a key comes twice in the delivery; merging the table as one", table)
            if savepoint.unindexed:
                claims_tables.index_table(cur, warehouse_table, schema, chunks.plan)  # the table is empty again
            whole = claims_tables.gather_chunks(
                cur, chunks.chunks, f"{claims_tables.staging_name(self.batch_id, table)}_typed"
            )
            merge = _TableMerge(chunks.plan, savepoint)
            written = claims_tables.merge_table(
                cur, whole, warehouse_table, schema, chunks.plan, self.batch_id, self.source.name
            )
            merge.add(whole, written, claims_tables.staged_counts(cur, whole))
            superseded.update(claims_tables.superseded_counts(cur, whole))
            claims_tables.quarantine_rows(cur, whole, self.batch_id, self.file_names)

        savepoint.finish(
            merge.written == merge.good,
            build_key=lambda: claims_tables.index_table(cur, warehouse_table, schema, chunks.plan),
            merge_whole=merge_whole,
        )
        if merge.suite_counts:  # else the suite reads the table (a whole-table merge, a suite not summed)
            self.suite_counts[self.warehouse_table(table)] = merge.suite_counts
        routes = self.routes.get(table, Counter())
        log.info("%s: %s", table, ", ".join(f"{routes[r]} {r}" for r in _ROUTES))
        for landed_file in files:
            counts = file_counts[landed_file.file_no]
            good, bad = merge.staged.get(landed_file.file_no, (0, 0))
            # the typing and the merge may quarantine more rows than the reader did: those move from loaded
            counts.rows_quarantined = bad
            counts.rows_superseded = superseded.get(landed_file.file_no, 0)
            if good + bad != counts.rows_read:
                raise LoadError(
                    f"{landed_file.name}: read {counts.rows_read} rows but staged {good + bad}; "
                    "the counts must reconcile"
                )
        if merge.written != merge.good:
            raise LoadError(f"{table}: {merge.good} good rows but {merge.written} written; the counts must reconcile")
        self.times.commit += time.perf_counter() - clock

    def _in_dependency_order(self, tables: list[str]) -> list[str]:
        """Tables that other tables' suites require (DCIR's ER_PRS_F for its detail tables) come first, so that
        each suite can run as soon as its own table is merged."""
        required = {r for t in tables for r in self._required_by_suite(t)}
        return sorted(tables, key=lambda t: (self.warehouse_table(t) not in required, t))

    def _required_by_suite(self, table: str) -> set[str]:
        suite = load_table_suites().get(self.warehouse_table(table))
        columns = suite.columns.values() if suite else ()
        return {c["requires"] for c in columns if isinstance(c, dict) and c.get("requires")}

    def _suites_ready(self, tables: list[str], finished: list[str]):
        """Finished tables whose suite requires no table of this batch that is still to be merged; once each."""
        pending = {self.warehouse_table(t) for t in tables if t not in finished}
        for table in finished:
            if table not in self.suites_run and not (self._required_by_suite(table) & pending):
                self.suites_run.add(table)
                yield table

    def _suite(self, cur, table: str) -> list:
        """The table's suite on this batch's rows, while the next table is still being typed."""
        if not self.source.quality.suites:
            return []
        clock = time.perf_counter()
        self.position = f"while running the quality suite of {table}"
        warehouse_table = self.warehouse_table(table)
        outcomes = evaluate_tables(
            cur, self.batch_id, self.source.name, [warehouse_table], self.source.quality, self.suite_counts
        )
        seconds = time.perf_counter() - clock
        self.times.suites += seconds
        self.times.suites_waited += seconds
        self.times.verify += seconds
        return outcomes

    def _table_of(self, path: Path) -> str:
        table = self.profile.table_for(path)
        if table not in self.profile.tables:
            # the name of a file that is no table may be anything, a person's name included: it is never said, only
            # where the file is among the delivery's files
            siblings = sorted(p.name for p in path.parent.iterdir() if p.is_file() and is_claims_file(p))
            where = f"file {siblings.index(path.name) + 1} of {len(siblings)}" if path.name in siblings else "a file"
            raise DeliveryError(
                f"{where} of the delivery (by name order) is named after no table of the {self.profile.name} "
                "profile; nothing of the delivery was loaded"
            )
        return table

    def _plan(self, landed_file: LandedFile) -> FilePlan:
        """How a file is read, from its header (checked here, before anything is written)."""
        schema = self.profile.tables[landed_file.resource_type]
        opened = open_claims_file(landed_file.path, landed_file.name, self.profile, schema)
        providers = self.source.privacy.providers
        columns, persons = plan_columns(
            schema, opened.header, self.profile.privacy, providers, self.source.privacy.keep_free_text
        )
        return FilePlan(
            self.source.format,
            landed_file.resource_type,
            landed_file.file_no,
            columns,
            persons,
            len(opened.header),
            opened.encoding,
            landed_file.name,
        )


@dataclass(frozen=True)
class _ReadChunk:
    """A chunk of a file, in spools, for the copy stage."""

    table: str
    chunk_no: int
    landed_file: LandedFile
    chunk: Chunk


@dataclass(frozen=True)
class _CopiedChunk:
    """A chunk staged: its typed table, and its text staging still to type (None when all was copied as typed)."""

    table: str
    typed: str
    text: str | None


@dataclass(frozen=True)
class _TypedChunk:
    """A chunk typed, with its good and bad rows per file number, for the merge."""

    table: str
    chunk: str
    counts: dict[int, tuple[int, int]]


@dataclass(frozen=True)
class _TableEnd:
    """Every chunk of the table has been sent."""

    table: str


@dataclass(frozen=True)
class _ChunkSuite:
    """A typed chunk's suite counts (`_count_suite`), sent after the chunk, which the load merges meanwhile."""

    table: str
    chunk: str
    counts: list[int] | None


_ROUTES = ("copied as typed", "typed from text", "chunks typed again from text")
COPY_OPTIONS = "FORMAT text, NULL ''"  # an empty field is NULL: the reader has made every empty value an absent one


@dataclass
class _TableMerge:
    """What the chunks of one table have written so far."""

    plan: list
    savepoint: SavepointMerge  # plain inserts while every key is new; a table made by this batch is keyed at its end
    chunks: list[str] = field(default_factory=list)
    counts: list[dict[int, tuple[int, int]]] = field(default_factory=list)  # each chunk's staged counts
    written: int = 0
    good: int = 0
    staged: dict[int, tuple[int, int]] = field(default_factory=dict)  # file number: (good, bad)
    # the suite's counts summed over the merged chunks; None once a chunk came without them
    suite_counts: list[int] | None = field(default_factory=list)

    def add_suite_counts(self, counts: list[int] | None) -> None:
        if counts is None or self.suite_counts is None:
            self.suite_counts = None
        else:
            self.suite_counts = [a + b for a, b in itertools.zip_longest(self.suite_counts, counts, fillvalue=0)]

    def add(self, chunk: str, written: int, staged: dict[int, tuple[int, int]]) -> None:
        self.chunks.append(chunk)
        self.counts.append(staged)
        self.written += written
        for file_no, (good, bad) in staged.items():
            before = self.staged.get(file_no, (0, 0))
            self.staged[file_no] = (before[0] + good, before[1] + bad)
            self.good += good

    def restart_by_key(self) -> list[tuple[str, dict[int, tuple[int, int]]]]:
        """Forget what was written (rolled back) and merge by key from now on; returns the chunks to merge again."""
        earlier = list(zip(self.chunks, self.counts, strict=True))
        self.chunks, self.counts, self.written, self.good, self.staged = [], [], 0, 0, {}
        return earlier


# --- the reader: claims files into COPY spools, each row pseudonymised and routed ----------------------------

CHUNK_BYTES = 8 << 20  # input per chunk: a chunk is copied and typed while the next is read (16 MiB: slower at 100k)
RANGE_BYTES = 1 << 20  # input per task of a worker
CHECK_ROWS = 1024  # how often the reader in order looks at its chunk's size and at the batch's stop
_SPOOL_NAME = re.compile(r"\.[0-9]+\.(w|here)\.(careful\.)?copy(\.[0-9]+)?$")  # `_spools`, a worker's with its pid


@dataclass(frozen=True)
class FilePlan:
    """What reading one landed file takes, in a worker too."""

    profile: str
    table: str
    file_no: int
    columns: list[ColumnPlan]
    persons: list[tuple[int, str]]
    width: int  # values per row, as the header has
    encoding: str
    label: str  # the file's name in messages


@dataclass
class Chunk:
    """Spools of a part of a file, and what was counted while writing them."""

    native: list[Path] = field(default_factory=list)  # rows to copy straight into typed columns
    careful: list[Path] = field(default_factory=list)  # rows to type from text
    rows_read: int = 0
    wrong_width: int = 0  # rows already quarantined by the reader (of the wrong width, or holding a NUL)
    careful_rows: int = 0
    seconds: float = 0.0  # spent reading and encoding (summed over the workers)

    @property
    def native_rows(self) -> int:
        return self.rows_read - self.careful_rows

    def add(self, other: Chunk) -> None:
        self.native += [p for p in other.native if p not in self.native]
        self.careful += [p for p in other.careful if p not in self.careful]
        self.rows_read += other.rows_read
        self.wrong_width += other.wrong_width
        self.careful_rows += other.careful_rows
        self.seconds += other.seconds


class RowEncoder:
    """One file's rows as COPY text rows (an empty field is NULL: the reader has made every empty value an absent
    one), each written to the spool of its route; rows of the wrong width are kept with their reason, so that
    nothing read goes unaccounted."""

    def __init__(self, plan: FilePlan, tokens: Tokeniser):
        schema = load_profile(plan.profile).tables[plan.table]
        self.plan = plan
        self.transform = RowTransform(plan.columns, plan.persons, tokens)
        self.native = native_row_test(schema, plan.columns)

    def encode(
        self,
        rows: Iterable[tuple[int, list[str]]],
        write_native: Callable[[str], object],
        write_careful: Callable[[str], object],
        chunk: Chunk,
        pause: Callable[[], bool] | None = None,
    ) -> bool:
        """Write rows until they run out (True) or `pause`, asked every CHECK_ROWS rows, says to stop (False)."""
        file_no, width, transform, native = self.plan.file_no, self.plan.width, self.transform, self.native
        blanks = "\t" * len(self.plan.columns)
        tabs = len(self.plan.columns) - 1
        read = careful = wrong_width = 0
        try:
            for row_no, values in rows:
                read += 1
                if len(values) != width:
                    wrong_width += 1
                    careful += 1
                    write_careful(
                        f"{file_no}\t{row_no}\t\twrong_column_count\texpected {width} values, found "
                        f"{len(values)}{_line_breaks(values)}\t{blanks}\n"
                    )
                    continue
                cells, person = transform(values)
                line = "\t".join(cells)
                # one test on the joined line: only a row holding a special character has its fields escaped
                if line.count("\t") != tabs or "\\" in line or "\n" in line or "\r" in line or "\0" in line:
                    if "\0" in line:  # PostgreSQL's text cannot hold it
                        wrong_width += 1
                        careful += 1
                        write_careful(
                            f"{file_no}\t{row_no}\t\tnul_character\ta value holds a NUL character, which PostgreSQL "
                            f"cannot store\t{blanks}\n"
                        )
                        continue
                    digest = row_digest(cells)
                    line = "\t".join(map(escape_text, cells))
                    write = write_careful
                else:
                    digest = row_digest(cells, line)
                    write = write_native if native(line) else write_careful
                if write is write_careful:
                    careful += 1
                write(
                    f"{file_no}\t{row_no}\t{person or ''}\t\t\t{digest}\t{line}\n"
                    if cells
                    else f"{file_no}\t{row_no}\t{person or ''}\t\t\t{digest}\n"
                )
                if read % CHECK_ROWS == 0 and pause is not None and pause():
                    return False
            return True
        finally:
            chunk.rows_read += read
            chunk.careful_rows += careful
            chunk.wrong_width += wrong_width


class ClaimsReader(WorkerPool):
    """Reads a batch's claims files into chunks, in worker processes when there is more than one core. Use as a
    context manager: the workers stop with it."""

    def __init__(self, keyring: Keyring, id_space: str, workers: int | None = None) -> None:
        super().__init__(_start_worker, (keyring, id_space), workers)
        self.tokens = Tokeniser(keyring, id_space=id_space)

    def chunks(self, path: Path, label: str, plan: FilePlan, stop) -> Iterator[Chunk]:
        """The file's chunks, in order (at least one); none more once `stop` is set."""
        profile = load_profile(plan.profile)
        schema = profile.tables[plan.table]
        rest: tuple[int, int] | None = (0, 1)
        if self.parallel and _cut_at_newlines(path, plan.encoding):
            ranges = LineRanges(path, RANGE_BYTES, label)
            yield from self._chunks_of_ranges(path, plan, ranges, stop)
            rest = ranges.rest
        if rest is None or stop.is_set():
            return
        if rest == (0, 1):
            rows = open_claims_file(path, label, profile, schema, plan.encoding).rows
        else:
            rows = rows_of_range(path, profile, schema, plan.encoding, plan.width, rest[0], None, rest[1], label)
        encoder = RowEncoder(plan, self.tokens)
        yield from self._chunks_in_order(path, encoder, iter(rows), stop, first=rest[0] // CHUNK_BYTES)

    def _chunks_of_ranges(self, path: Path, plan: FilePlan, ranges: LineRanges, stop) -> Iterator[Chunk]:
        """Chunks from the workers: the ranges come back in file order, so a chunk is whole once a range of the next
        comes back."""
        chunk, part = Chunk(), None
        for done, done_part in self._encoded_ranges(path, plan, ranges, stop):
            if part is not None and done_part != part:
                yield chunk
                chunk = Chunk()
            chunk.add(done)
            part = done_part
        if part is not None or ranges.rest is None:
            yield chunk

    def _encoded_ranges(self, path: Path, plan: FilePlan, ranges: LineRanges, stop) -> Iterator[tuple[Chunk, int]]:
        """Each range as a worker encoded it, with its part, in file order."""
        tasks = (
            (_encode_range, plan, str(path), start, end, line, *map(str, _spools(path, start // CHUNK_BYTES, "w")))
            for start, end, line in ranges
        )
        return self.in_order(tasks, stop)

    def _chunks_in_order(self, path: Path, encoder: RowEncoder, rows, stop, first: int) -> Iterator[Chunk]:
        for part in range(first, 1 << 62):
            started = time.perf_counter()
            chunk = Chunk(*([spool] for spool in _spools(path, part, "here")))
            with (
                chunk.native[0].open("w", encoding="utf-8", newline="", buffering=1 << 20) as native,
                chunk.careful[0].open("w", encoding="utf-8", newline="", buffering=1 << 20) as careful,
            ):
                exhausted = encoder.encode(rows, native.write, careful.write, chunk, _chunk_full(stop, native, careful))
            chunk.seconds = time.perf_counter() - started
            yield chunk
            if exhausted or stop.is_set():
                return


def _cut_at_newlines(path: Path, encoding: str) -> bool:
    """Whether a file can be read at an offset and cut at its newline bytes: a plain file, in an encoding where a
    newline byte is always a newline."""
    return not path.name.lower().endswith((".gz", ".zip")) and codecs.lookup(encoding).name in ASCII_COMPATIBLE


def _chunk_full(stop, native, careful) -> Callable[[], bool]:
    return lambda: stop.is_set() or native.tell() + careful.tell() >= CHUNK_BYTES


def _line_breaks(values: list[str]) -> str:
    """What a row of the wrong width says of the line breaks inside its values: a quote left open takes the lines
    after it into one value, and they are quarantined with its row."""
    breaks = sum(value.count("\n") for value in values)
    return f"; its values hold {breaks} line breaks (a quote not closed?)" if breaks else ""


def remove_spools(folder: Path) -> None:
    """The spools that a stopped batch left beside its landed files (a finished batch has removed its own)."""
    if not folder.is_dir():  # a batch stopped before it landed anything
        return
    for spool in folder.iterdir():
        if _SPOOL_NAME.search(spool.name):
            spool.unlink(missing_ok=True)


def _spools(path: Path, part: int, writer: str) -> tuple[Path, Path]:
    """A writer's two spools of a part of a file, beside its landing copy."""
    return (
        path.with_name(f"{path.name}.{part}.{writer}.copy"),
        path.with_name(f"{path.name}.{part}.{writer}.careful.copy"),
    )


# --- the reading workers' side -----------------------------------------------------------------

_tokens: Tokeniser | None = None
_encoders: dict[int, RowEncoder] = {}


def _start_worker(keyring: Keyring, id_space: str) -> None:
    global _tokens
    _tokens = Tokeniser(keyring, id_space=id_space)
    _encoders.clear()


def _encode_range(
    plan: FilePlan, path: str, start: int, end: int, line: int, native: str, careful: str
) -> tuple[Chunk, int]:
    """Encode a range of whole lines of the file, appending its rows to this worker's spools of the part (named
    for the part; this worker's own copy carries its process id)."""
    started = time.perf_counter()
    encoder = _encoders.get(plan.file_no)
    if encoder is None or encoder.plan != plan:
        encoder = _encoders[plan.file_no] = RowEncoder(plan, _tokens)
    profile = load_profile(plan.profile)
    schema = profile.tables[plan.table]
    rows = rows_of_range(Path(path), profile, schema, plan.encoding, plan.width, start, end, line, plan.label)
    native_path, careful_path = (Path(f"{spool}.{os.getpid()}") for spool in (native, careful))
    chunk = Chunk([native_path], [careful_path])
    with (
        native_path.open("a", encoding="utf-8", newline="") as native_out,
        careful_path.open("a", encoding="utf-8", newline="") as careful_out,
    ):
        encoder.encode(rows, native_out.write, careful_out.write, chunk)
    chunk.seconds = time.perf_counter() - started
    return chunk, start // CHUNK_BYTES
