"""Claims files read into COPY spools: each row pseudonymised, its digest taken, and written to the spool of its
typing route (`claims_tables.native_row_test`). A plain file is read in byte ranges of whole lines by worker
processes, as the FHIR path reads NDJSON, for as long as no quote can hide a line break in a field; the rest of such
a file, and a compressed one, is read here, in order. Chunks of about CHUNK_BYTES of input come out in file order."""

from __future__ import annotations

import codecs
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from health_ingest.encoding import DEFAULT_NICENESS, ENV_NICENESS, ENV_WORKERS, setting, worker_pool
from health_ingest.formats.claims import (
    ASCII_COMPATIBLE,
    LineRanges,
    load_profile,
    open_claims_file,
    rows_of_range,
)
from health_ingest.privacy.claims import ColumnPlan, RowTransform, row_digest
from health_ingest.privacy.keyring import Keyring
from health_ingest.privacy.tokens import Tokeniser
from health_ingest.warehouse.claims_tables import native_row_test
from health_ingest.warehouse.staging import escape_text

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
    wrong_width: int = 0  # rows already quarantined by the reader
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
                if line.count("\t") != tabs or "\\" in line or "\n" in line or "\r" in line:
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


class ClaimsReader:
    """Reads a batch's claims files into chunks, in worker processes when there is more than one core (at most two
    ranges per worker in flight, so memory does not grow with the file). Use as a context manager: the workers stop
    with it."""

    def __init__(self, keyring: Keyring, id_space: str, workers: int | None = None) -> None:
        self.workers = workers if workers is not None else setting(ENV_WORKERS, os.cpu_count() or 1, 1, 256)
        self.niceness = setting(ENV_NICENESS, DEFAULT_NICENESS, 0, 19)
        self.tokens = Tokeniser(keyring, id_space=id_space)
        self._keyring, self._id_space = keyring, id_space
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ClaimsReader:
        if self.workers > 1:
            self._pool = worker_pool(self.workers, _start_worker, (self._keyring, self._id_space, self.niceness))
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def chunks(self, path: Path, label: str, plan: FilePlan, stop) -> Iterator[Chunk]:
        """The file's chunks, in order (at least one); none more once `stop` is set."""
        profile = load_profile(plan.profile)
        schema = profile.tables[plan.table]
        rest: tuple[int, int] | None = (0, 1)
        if self._pool is not None and _cut_at_newlines(path, plan.encoding):
            ranges = LineRanges(path, RANGE_BYTES)
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
        """Each range as a worker encoded it, with its part, in file order; at most two per worker in flight."""
        in_flight: deque[Future] = deque()
        for start, end, line in ranges:
            if stop.is_set():
                return
            spools = _spools(path, start // CHUNK_BYTES, "w")
            in_flight.append(self._pool.submit(_encode_range, plan, str(path), start, end, line, *map(str, spools)))
            while len(in_flight) >= 2 * self.workers or (in_flight and in_flight[0].done()):
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

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
    for spool in folder.iterdir():
        if _SPOOL_NAME.search(spool.name):
            spool.unlink(missing_ok=True)


def _spools(path: Path, part: int, writer: str) -> tuple[Path, Path]:
    """A writer's two spools of a part of a file, beside its landing copy."""
    return (
        path.with_name(f"{path.name}.{part}.{writer}.copy"),
        path.with_name(f"{path.name}.{part}.{writer}.careful.copy"),
    )


# --- implementation details: the worker side ----------------------------------------------------

_tokens: Tokeniser | None = None
_encoders: dict[int, RowEncoder] = {}


def _start_worker(keyring: Keyring, id_space: str, niceness: int) -> None:
    global _tokens
    os.nice(niceness)
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
