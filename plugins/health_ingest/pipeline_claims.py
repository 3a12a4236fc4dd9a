"""One claims delivery as one batch: land, check every header, read, pseudonymise, stage, type, verify, commit.

The same batch life as FHIR (`pipeline.run_batch`): one source at a time, one transaction, nothing partial.
"""

from __future__ import annotations

import csv
import logging
import queue
import threading
import time
from pathlib import Path

from health_ingest import config
from health_ingest.errors import DeliveryError, LoadError
from health_ingest.formats.claims import ClaimsProfile, TableSchema, is_claims_file, load_profile, open_claims_file
from health_ingest.pipeline import (
    BatchResult,
    FileCounts,
    ProgressCallback,
    StepTimes,
    committed_result,
    mark_batch_committed,
    run_batch,
)
from health_ingest.privacy.claims import plan_columns, transform_row
from health_ingest.privacy.keyring import Keyring
from health_ingest.privacy.tokens import Tokeniser
from health_ingest.quality.suites import evaluate_tables, quality_gate
from health_ingest.sources.landing import SAFE_NAME, LandedFile, land_files
from health_ingest.sources.registry import Source
from health_ingest.warehouse import claims_tables
from health_ingest.warehouse.staging import copy_spool

log = logging.getLogger(__name__)


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
        self.batch_id, self.source, self.progress = batch_id, source, progress
        self.key_id = keyring.active_id
        self.tokens = Tokeniser(keyring, id_space=source.id_space)
        self.profile: ClaimsProfile = load_profile(source.format)
        self.position = "while landing the delivery"
        self.reader_position = "while reading the delivery"
        self.times = StepTimes()

    def load(self, conn, copy_conn, delivery: Path) -> BatchResult:
        started = clock = time.perf_counter()
        landing = config.state_dir() / "landing" / self.source.name / self.batch_id
        landed = land_files(delivery, landing, is_claims_file, self._table_of, what="claims file (*.csv, *.csv.gz)")
        self.times.land = time.perf_counter() - clock
        self.position = "while checking the headers"
        plans = {f.file_no: self._plan(f) for f in landed.loadable}  # every header, before anything is written

        conn.autocommit = False
        file_counts = {f.file_no: FileCounts() for f in landed.loadable}
        tables = sorted({f.resource_type for f in landed.loadable})
        files_of = {table: [f for f in landed.loadable if f.resource_type == table] for table in tables}
        with conn.cursor() as cur, copy_conn.cursor() as copy_cur:
            staged_of = {
                table: claims_tables.create_staging(
                    copy_cur, self.batch_id, table, plans[files_of[table][0].file_no][0]
                )
                for table in tables
            }
            # a thread reads, pseudonymises and copies the next table while PostgreSQL types and merges this one
            staged_tables: queue.Queue = queue.Queue()
            stop = threading.Event()
            reader = threading.Thread(
                target=self._stage_files,
                args=(copy_cur, staged_of, tables, files_of, plans, file_counts, staged_tables, stop),
                daemon=True,
            )
            reader.start()
            try:
                while (item := staged_tables.get()) is not None:
                    if isinstance(item, BaseException):
                        self.position = self.reader_position
                        raise item
                    self._type_and_merge(cur, item, staged_of[item], files_of[item], plans, file_counts)
            finally:
                stop.set()
                reader.join()
            clock = time.perf_counter()
            self.position = "while running the quality suites"
            warehouse_tables = [f"claims.{self.profile.warehouse_table(t)}" for t in tables]
            outcomes = (
                evaluate_tables(cur, self.batch_id, self.source.name, warehouse_tables, self.source.quality)
                if self.source.quality.suites
                else []
            )
            self.times.suites = self.times.suites_waited = time.perf_counter() - clock
            self.times.verify += self.times.suites
            quality_gate(cur, self.batch_id, self.source, outcomes, self.times.suites)
            clock = time.perf_counter()
            self.position = "while committing"
            counts, commit_seq = mark_batch_committed(cur, self.batch_id, landed, file_counts, self.times, started)
        conn.commit()
        self.times.commit += time.perf_counter() - clock
        return committed_result(self, landed, counts, commit_seq)

    def _type_and_merge(self, cur, table: str, staged: str, files: list[LandedFile], plans, file_counts) -> None:
        clock = time.perf_counter()
        self.position = f"while typing and merging {table}"
        schema = self.profile.tables[table]
        plan = plans[files[0].file_no][0]
        warehouse_table = self.profile.warehouse_table(table)
        claims_tables.ensure_table(cur, warehouse_table, schema, plan)
        typed = claims_tables.type_staged(cur, staged, schema, plan)
        duplicates = claims_tables.merge_table(
            cur, typed, warehouse_table, schema, plan, self.batch_id, self.source.name
        )
        self._reconcile(cur, typed, files, file_counts, duplicates)
        claims_tables.quarantine_rows(cur, typed, self.batch_id, {f.file_no: f.name for f in files})
        self.times.commit += time.perf_counter() - clock

    def _stage_files(self, copy_cur, staged_of, tables, files_of, plans, file_counts, staged_tables, stop) -> None:
        """Each file into a CSV spool, then COPY (autocommit); each table's name once all its files are staged."""
        try:
            for table in tables:
                schema = self.profile.tables[table]
                for landed_file in files_of[table]:
                    if stop.is_set():
                        return
                    counts = file_counts[landed_file.file_no]
                    spool = self._encode_file(landed_file, schema, plans[landed_file.file_no], counts, stop)
                    clock = time.perf_counter()
                    self.reader_position = f"while staging {landed_file.name}"
                    copy_spool(copy_cur, staged_of[table], spool, columns=None, csv=True)
                    spool.unlink()
                    self.times.stage += time.perf_counter() - clock
                    if self.progress:
                        self.progress(landed_file.name, counts.rows_read, True)
                staged_tables.put(table)
            staged_tables.put(None)
        except BaseException as error:
            staged_tables.put(error)

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

    def _plan(self, landed_file: LandedFile):
        schema = self.profile.tables[landed_file.resource_type]
        opened = open_claims_file(landed_file.path, landed_file.name, self.profile, schema)
        providers = self.source.privacy.providers
        return (*plan_columns(schema, opened.header, self.profile.privacy, providers), len(opened.header))

    def _encode_file(self, landed_file: LandedFile, schema: TableSchema, plan, counts, stop) -> Path:
        """Rows as CSV for COPY, where an empty unquoted field is NULL (the reader has made every empty value an
        absent one); rows of the wrong width are kept with their reason, so that nothing read goes unaccounted."""
        columns, persons, width = plan
        opened = open_claims_file(landed_file.path, landed_file.name, self.profile, schema)
        spool = landed_file.path.with_name(landed_file.path.name + ".copy")
        clock = time.perf_counter()
        self.reader_position = f"while reading {landed_file.name}"
        blanks = [None] * len(columns)
        file_no = landed_file.file_no
        with spool.open("w", encoding="utf-8", newline="", buffering=1 << 20) as out:
            writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            for row_no, values in opened.rows:
                counts.rows_read += 1
                if len(values) != width:
                    counts.rows_quarantined += 1
                    message = f"expected {width} values, found {len(values)}"
                    writer.writerow([file_no, row_no, None, "wrong_column_count", message, *blanks])
                    continue
                cells, person = transform_row(values, columns, persons, self.tokens)
                writer.writerow([file_no, row_no, person, None, None, *cells])
                if counts.rows_read % 50_000 == 0:
                    if stop.is_set():
                        break
                    if self.progress:
                        self.progress(landed_file.name, counts.rows_read, False)
        self.times.pseudonymise += time.perf_counter() - clock
        log.info("%s: %d rows read", landed_file.name, counts.rows_read)
        return spool

    def _reconcile(self, cur, staged: str, files: list[LandedFile], file_counts, duplicates: dict[int, int]) -> None:
        for file_no, count in duplicates.items():
            file_counts[file_no].rows_quarantined += count
        staged_counts = claims_tables.staged_counts(cur, staged)
        for landed_file in files:
            counts = file_counts[landed_file.file_no]
            good, bad = staged_counts.get(landed_file.file_no, (0, 0))
            # the typing step may quarantine more rows than the reader did: those move from loaded to quarantined
            counts.rows_quarantined = bad
            if good + bad != counts.rows_read:
                raise LoadError(
                    f"{landed_file.name}: read {counts.rows_read} rows but staged {good + bad}; "
                    "the counts must reconcile"
                )
