"""One claims delivery as one batch: land, check every header, read, pseudonymise, stage, type, verify, commit.

The same batch life as FHIR (`pipeline.run_batch`): one source at a time, one transaction, nothing partial.
Four stages run at once, a chunk apart: worker processes read and pseudonymise the files into spools in COPY's text
format (`claims_reader`), a thread copies each chunk's usual rows straight into typed columns and its other rows
into text staging, a third connection types the staged rows and counts the suites on each chunk, and the load
transaction merges each typed chunk.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from health_ingest import config
from health_ingest.claims_reader import Chunk, ClaimsReader, FilePlan, remove_spools
from health_ingest.errors import DeliveryError, LoadError
from health_ingest.formats.claims import ClaimsProfile, is_claims_file, load_profile, open_claims_file
from health_ingest.pipeline import (
    BatchResult,
    FileCounts,
    ProgressCallback,
    StageFailure,
    StepTimes,
    committed_result,
    mark_batch_committed,
    run_batch,
)
from health_ingest.privacy.claims import plan_columns
from health_ingest.privacy.keyring import Keyring
from health_ingest.quality.suites import (
    count_chunk,
    counts_by_chunk,
    evaluate_tables,
    load_table_suites,
    quality_gate,
)
from health_ingest.sources.landing import SAFE_NAME, LandedFile, land_files
from health_ingest.sources.registry import Source
from health_ingest.warehouse import claims_tables
from health_ingest.warehouse.connection import connect
from health_ingest.warehouse.staging import copy_files

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2  # chunks waiting between two stages (spools on disk, staged chunks in PostgreSQL)


def run_claims_batch(
    delivery: Path,
    source: Source,
    *,
    url: str | None = None,
    keyring: Keyring | None = None,
    progress: ProgressCallback | None = None,
) -> BatchResult:
    """Load one claims delivery (CSV, pipe-delimited, gzip or zip files) with the source's format profile."""
    return run_batch(delivery, source, "claims", _ClaimsLoader, url=url, keyring=keyring, progress=progress)


# --- implementation details -------------------------------------------------------------------


class _ClaimsLoader:
    def __init__(self, batch_id: str, source: Source, keyring: Keyring, progress, warehouse: str):
        self.batch_id, self.source, self.progress, self.warehouse = batch_id, source, progress, warehouse
        self.key_id = keyring.active_id
        self.keyring = keyring
        self.profile: ClaimsProfile = load_profile(source.format)
        self.position = "while landing the delivery"
        self.stage_positions = {"read": "while reading the delivery", "copy": "while staging", "type": "while typing"}
        self.times = StepTimes()
        self.suites_run: set[str] = set()
        self.file_names: dict[int, str] = {}  # by file number, for the quarantine
        self.routes: dict[str, Counter] = {}  # by table: rows copied as typed, rows typed from text, chunks retyped
        self.suite_counts: dict[str, list[int]] = {}  # by warehouse table: its suite's counts, summed chunk by chunk

    def load(self, conn, copy_conn, delivery: Path) -> BatchResult:
        started = clock = time.perf_counter()
        landing = config.state_dir() / "landing" / self.source.name / self.batch_id
        landed = land_files(delivery, landing, is_claims_file, self._table_of, what="claims file (*.csv, *.csv.gz)")
        self.times.land = time.perf_counter() - clock
        self.position = "while checking the headers"
        plans = {f.file_no: self._plan(f) for f in landed.loadable}  # every header, before anything is written

        conn.autocommit = False
        file_counts = {f.file_no: FileCounts() for f in landed.loadable}
        self.file_names = {f.file_no: f.name for f in landed.loadable}
        tables = self._in_dependency_order(sorted({f.resource_type for f in landed.loadable}))
        files_of = {table: [f for f in landed.loadable if f.resource_type == table] for table in tables}
        for table in tables:
            claims_tables.check_columns(table, plans[files_of[table][0].file_no].columns)
        typing_conn = connect(self.warehouse)
        typing_conn.autocommit = True
        stop = threading.Event()
        spools, staged, typed = (queue.Queue(QUEUE_DEPTH), queue.Queue(QUEUE_DEPTH), queue.Queue())
        stages = [
            threading.Thread(target=self._read_files, args=(tables, files_of, plans, file_counts, spools, stop)),
            threading.Thread(target=self._copy_chunks, args=(copy_conn, plans, spools, staged, stop)),
            threading.Thread(target=self._type_chunks, args=(typing_conn, files_of, plans, staged, typed, stop)),
        ]
        outcomes = []
        try:
            for stage in stages:
                stage.start()
            with conn.cursor() as cur:
                merges: dict[str, _TableMerge] = {}
                finished: list[str] = []
                while (item := _next(typed, stop)) is not None:
                    if isinstance(item, StageFailure):
                        self.position = item.position
                        raise item.error
                    if isinstance(item, _ChunkSuite):
                        self._add_suite_counts(cur, item, merges[item.table], tables, finished)
                        continue
                    table, chunk, staged_counts = item
                    if chunk is not None:
                        plan = plans[files_of[table][0].file_no].columns
                        self._merge_chunk(cur, table, chunk, staged_counts, merges, plan)
                        continue
                    self._finish_table(cur, table, merges.pop(table), files_of[table], file_counts)
                    finished.append(table)
                    for ready in self._suites_ready(tables, finished):
                        outcomes += self._suite(cur, ready)
                clock = time.perf_counter()
                self.position = "while running the quality suites"
                quality_gate(cur, self.batch_id, self.source, outcomes, self.times.suites)
                self.times.verify += time.perf_counter() - clock
                clock = time.perf_counter()
                self.position = "while committing"
                counts, commit_seq = mark_batch_committed(cur, self.batch_id, landed, file_counts, self.times, started)
            conn.commit()
            self.times.commit += time.perf_counter() - clock
        finally:
            stop.set()
            for stage in stages:
                stage.join()
            typing_conn.close()
            remove_spools(landing)
        return committed_result(self, landed, counts, commit_seq)

    # --- the stages, each in its own thread; an error travels down the queues to the load transaction ---------

    def _read_files(self, tables, files_of, plans, file_counts, spools: queue.Queue, stop) -> None:
        """Each file into chunks of about `claims_reader.CHUNK_BYTES` of input; then the table's end."""
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
                            if not _put(spools, (table, chunk_no, landed_file, chunk), stop):
                                return
                            chunk_no += 1
                        if stop.is_set():
                            return
                        log.info("%s: %d rows read", landed_file.name, counts.rows_read)
                        if self.progress:
                            self.progress(landed_file.name, counts.rows_read, True)
                    _put(spools, (table, None, None, None), stop)
            _put(spools, None, stop)
        except BaseException as error:
            _put(spools, StageFailure(error, self.stage_positions["read"]), stop)

    def _copy_chunks(self, copy_conn, plans, spools: queue.Queue, staged: queue.Queue, stop) -> None:
        """Each chunk's native spools straight into its typed chunk, and its careful spools into a text staging
        table (autocommit); native spools that do not fit their types (an overflow, 31 February) are staged as text
        too, so that the careful casts quarantine what fails. The spools are then removed."""
        try:
            with copy_conn.cursor() as cur:
                while (item := _next(spools, stop)) is not None:
                    if isinstance(item, StageFailure):
                        _put(staged, item, stop)
                        return
                    table, chunk_no, landed_file, chunk = item
                    typed_name = text_name = None  # None, None: the table's end
                    if chunk_no is not None:
                        clock = time.perf_counter()
                        self.stage_positions["copy"] = f"while staging {landed_file.name}"
                        typed_name, text_name = self._copy_chunk(
                            cur, table, chunk_no, plans[landed_file.file_no], chunk
                        )
                        self.times.stage += time.perf_counter() - clock
                    if not _put(staged, (table, typed_name, text_name), stop):
                        return
            _put(staged, None, stop)
        except BaseException as error:
            _put(staged, StageFailure(error, self.stage_positions["copy"]), stop)

    def _copy_chunk(self, cur, table: str, chunk_no: int, plan: FilePlan, chunk: Chunk) -> tuple[str, str | None]:
        """The typed chunk's name, and that of its text staging (None when every row was copied as typed)."""
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
        return typed_name, text_name

    def _type_chunks(self, typing_conn, files_of, plans, staged: queue.Queue, typed: queue.Queue, stop) -> None:
        """Each chunk's text staging (if any) cast into its typed chunk (autocommit), then dropped, and the typed
        chunk's good and bad rows counted per file; then its suite counted, while the load transaction merges it;
        the table's end passed on."""
        try:
            with typing_conn.cursor() as cur:
                while (item := _next(staged, stop)) is not None:
                    if isinstance(item, StageFailure):
                        typed.put(item)
                        return
                    table, typed_name, text_name = item
                    if typed_name is not None:
                        clock = time.perf_counter()
                        self.stage_positions["type"] = f"while typing {table}"
                        if text_name is not None:
                            plan = plans[files_of[table][0].file_no].columns
                            claims_tables.type_staged(cur, text_name, typed_name, self.profile.tables[table], plan)
                            cur.execute(f"DROP TABLE {text_name}")
                        counts = claims_tables.staged_counts(cur, typed_name)
                        self.times.check += time.perf_counter() - clock
                        typed.put((table, typed_name, counts))
                        typed.put(
                            _ChunkSuite(table, typed_name, self._count_suite(cur, table, typed_name, in_load=False))
                        )
                    else:
                        typed.put((table, None, None))
            typed.put(None)
        except BaseException as error:
            typed.put(StageFailure(error, self.stage_positions["type"]))

    def _count_suite(self, cur, table: str, chunk: str, *, in_load: bool) -> list[int] | None:
        """The table suite's counts over a typed chunk, when they can be summed, in two parts (`count_chunk`):
        beside the load transaction (on the typing connection) those of the columns that read each row alone, and
        in it (`in_load`, the chunk merged) those of the columns that also read a table the batch has finished
        merging (its header table). The load transaction, which the batch waits for, counts only the latter."""
        warehouse_table = f"claims.{self.profile.warehouse_table(table)}"
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
        pending = {f"claims.{self.profile.warehouse_table(t)}" for t in tables if t not in finished}
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
            merge = merges[table] = _TableMerge(plan)
            merge.unindexed = claims_tables.ensure_table(cur, warehouse_table, self.profile.tables[table], plan)
            cur.execute("SAVEPOINT merge_table")
        written = None
        if merge.new_keys_only:
            written = claims_tables.insert_chunk(
                cur, chunk, warehouse_table, self.profile.tables[table], plan, self.batch_id, self.source.name
            )
            if written is None:
                cur.execute("ROLLBACK TO SAVEPOINT merge_table")
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
        again = merge.written != merge.good
        if merge.unindexed and not again:
            again = not claims_tables.index_table(cur, warehouse_table, schema, merge.plan)
        if again:
            log.info("%s: a key comes twice in the delivery; merging the table as one", table)
            cur.execute("ROLLBACK TO SAVEPOINT merge_table")
            if merge.unindexed:
                claims_tables.index_table(cur, warehouse_table, schema, merge.plan)  # the table is empty again
            whole = claims_tables.gather_chunks(
                cur, merge.chunks, f"{claims_tables.staging_name(self.batch_id, table)}_typed"
            )
            merge = _TableMerge(merge.plan)
            written = claims_tables.merge_table(
                cur, whole, warehouse_table, schema, merge.plan, self.batch_id, self.source.name
            )
            merge.add(whole, written, claims_tables.staged_counts(cur, whole))
            claims_tables.quarantine_rows(cur, whole, self.batch_id, self.file_names)
        cur.execute("RELEASE SAVEPOINT merge_table")
        if merge.suite_counts:  # else the suite reads the table (a whole-table merge, a suite not summed)
            self.suite_counts[f"claims.{self.profile.warehouse_table(table)}"] = merge.suite_counts
        routes = self.routes.get(table, Counter())
        log.info("%s: %s", table, ", ".join(f"{routes[r]} {r}" for r in _ROUTES))
        for landed_file in files:
            counts = file_counts[landed_file.file_no]
            good, bad = merge.staged.get(landed_file.file_no, (0, 0))
            # the typing and the merge may quarantine more rows than the reader did: those move from loaded
            counts.rows_quarantined = bad
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
        return sorted(tables, key=lambda t: (f"claims.{self.profile.warehouse_table(t)}" not in required, t))

    def _required_by_suite(self, table: str) -> set[str]:
        suite = load_table_suites().get(f"claims.{self.profile.warehouse_table(table)}")
        columns = suite.columns.values() if suite else ()
        return {c["requires"] for c in columns if isinstance(c, dict) and c.get("requires")}

    def _suites_ready(self, tables: list[str], finished: list[str]):
        """Finished tables whose suite requires no table of this batch that is still to be merged; once each."""
        pending = {f"claims.{self.profile.warehouse_table(t)}" for t in tables if t not in finished}
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
        warehouse_table = f"claims.{self.profile.warehouse_table(table)}"
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
            # the name of a file that is no table may be anything, a person's name included
            shown = path.name if SAFE_NAME.match(path.name) and len(path.name) <= 40 else "a file"
            shown_table = table if SAFE_NAME.match(table) and len(table) <= 40 else "that name"
            raise DeliveryError(
                f"{shown}: no table {shown_table} in the {self.profile.name} profile; "
                "nothing of the delivery was loaded"
            )
        return table

    def _plan(self, landed_file: LandedFile) -> FilePlan:
        """How a file is read, from its header (checked here, before anything is written)."""
        schema = self.profile.tables[landed_file.resource_type]
        opened = open_claims_file(landed_file.path, landed_file.name, self.profile, schema)
        providers = self.source.privacy.providers
        columns, persons = plan_columns(schema, opened.header, self.profile.privacy, providers)
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
    unindexed: bool = False  # created by this batch: its key and indexes are built once its rows are written
    new_keys_only: bool = True  # every chunk so far plainly inserted
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
        self.new_keys_only = False
        self.chunks, self.counts, self.written, self.good, self.staged = [], [], 0, 0, {}
        return earlier


def _put(channel: queue.Queue, item, stop: threading.Event) -> bool:
    """Hand an item to the next stage, unless the batch has stopped (then False)."""
    while not stop.is_set():
        try:
            channel.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _next(channel: queue.Queue, stop: threading.Event):
    """The next item from the stage before (a `StageFailure` included); None at the end or once stopped."""
    while not stop.is_set():
        try:
            return channel.get(timeout=0.2)
        except queue.Empty:
            continue
    return None
