"""The hot loop of the batch path: check, pseudonymise and encode lines as COPY rows, in chunks, on every core."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson

from health_ingest.errors import ConfigurationError
from health_ingest.formats.ndjson import read_lines
from health_ingest.privacy.dates import DateShifter
from health_ingest.privacy.escrow import EscrowCipher, encode_escrow_rows
from health_ingest.privacy.keyring import Keyring
from health_ingest.privacy.resources import ResourcePseudonymiser
from health_ingest.privacy.tokens import Tokeniser
from health_ingest.quality.checks import Rejection, check_line, last_updated
from health_ingest.quality.strict import StrictRules, strict_problem
from health_ingest.sources.registry import Source
from health_ingest.warehouse.staging import encode_loaded, encode_rejected

CHUNK_LINES = 2000
CHUNK_BYTES = 1 << 19  # about 512 KiB of raw lines
ENV_WORKERS = "HEALTH_INGEST_WORKERS"
# Workers run at the lowest priority: on a shared machine, the database (staging, merging, checking the previous
# parts) comes first and the workers take what it leaves, so that the batch does not end on a backlog of merges.
ENV_NICENESS = "HEALTH_INGEST_WORKER_NICENESS"
DEFAULT_NICENESS = 19


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
        self._rules = rules
        self.pseudonymiser = pseudonymiser
        self._pseudonymise = pseudonymiser.pseudonymise
        self._tokens = pseudonymiser.tokens
        self._escrow = escrow

    def encode(self, file_no: int, expected_type: str, lines: list[tuple[int, bytes]]) -> EncodedChunk:
        rows, rejected = [], 0
        pseudonymise, dumps, clock = self._pseudonymise, orjson.dumps, time.perf_counter
        check_seconds = pseudonymise_seconds = 0.0
        for line_no, raw in lines:
            t0 = clock()
            checked = check_line(raw, expected_type)
            t1 = clock()
            check_seconds += t1 - t0
            if self._strict and type(checked) is not Rejection:
                checked = strict_problem(checked, self._rules) or checked
            if type(checked) is Rejection:
                rejected += 1
                rows.append(encode_rejected(file_no, line_no, checked.reason, checked.message))
                continue
            updated = last_updated(checked)
            ids = pseudonymise(checked)
            rows.append(encode_loaded(file_no, line_no, ids.resource_id, ids.patient_id, updated, dumps(checked)))
            pseudonymise_seconds += clock() - t1
        escrow = encode_escrow_rows(self._escrow, self._tokens.drain_new_tokens()) if self._escrow else b""
        data = b"".join(rows)
        return EncodedChunk(
            data,
            escrow,
            len(lines),
            rejected,
            lines[0][0] if lines else 0,
            check_seconds,
            pseudonymise_seconds,
            len(data),
        )


class FileEncoder:
    """Encodes whole files chunk by chunk, in worker processes when there is more than one core.

    At most two chunks per worker are in flight, so memory does not grow with the file; chunks come back in
    file order. Use as a context manager: the workers stop with it.
    """

    def __init__(self, keyring: Keyring, source: Source, workers: int | None = None) -> None:
        self.workers = workers if workers is not None else setting(ENV_WORKERS, os.cpu_count() or 1, 1, 256)
        self.niceness = setting(ENV_NICENESS, DEFAULT_NICENESS, 0, 19)
        self.read_seconds = 0.0
        self._keyring, self._source = keyring, source
        self._pool: ProcessPoolExecutor | None = None
        self._local: ChunkEncoder | None = None

    def __enter__(self) -> FileEncoder:
        if self.workers > 1:
            self._pool = worker_pool(self.workers, _start_worker, (self._keyring, self._source, self.niceness))
        else:
            self._local = chunk_encoder(self._keyring, self._source)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

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
        if self._pool is None:
            for lines in self._chunks(path):
                yield self._local.encode(file_no, expected_type, lines)
            return
        in_flight: deque[Future] = deque()
        if not path.name.lower().endswith(".gz"):
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
                )
                for start, end, first_line in self._ranges(path)
            )
        else:
            tasks = ((_encode_in_worker, file_no, expected_type, lines) for lines in self._chunks(path))
        for task in tasks:
            in_flight.append(self._pool.submit(*task))
            if len(in_flight) >= 2 * self.workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    def _ranges(self, path: Path) -> Iterator[tuple[int, int, int]]:
        """(start, end, first line number) of runs of whole lines of about CHUNK_BYTES; one reused buffer counts
        the newlines, so that line numbers stay exact."""
        clock = time.perf_counter
        buffer = bytearray(CHUNK_BYTES)
        with path.open("rb") as handle:
            offset, line = 0, 1
            while True:
                started = clock()
                read = handle.readinto(buffer)
                if not read:
                    return
                rest = handle.readline() if read == CHUNK_BYTES else b""  # to the end of the line cut
                newlines = buffer.count(b"\n", 0, read) + rest.count(b"\n")
                self.read_seconds += clock() - started
                end = offset + read + len(rest)
                yield offset, end, line
                offset, line = end, line + newlines

    def _chunks(self, path: Path) -> Iterator[list[tuple[int, bytes]]]:
        """Chunks of at most CHUNK_LINES lines and about CHUNK_BYTES: large resources (notes, bundles) make
        fewer lines per chunk, so that memory in flight does not depend on what the file holds."""
        clock = time.perf_counter
        started = clock()
        chunk: list[tuple[int, bytes]] = []
        size = 0
        for entry in read_lines(path):
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


def worker_pool(workers: int, initializer, initargs: tuple) -> ProcessPoolExecutor:
    """Worker processes forked from the batch's process (they inherit its loaded modules and settings), each set up
    by `initializer` once."""
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=initializer, initargs=initargs
    )


def setting(name: str, default: int, low: int, high: int) -> int:
    """An integer setting from the environment, refused with a message that names it when out of range."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be a whole number from {low} to {high}, not {raw!r}")
    return value


# --- implementation details: the worker side ----------------------------------------------------

_worker: ChunkEncoder | None = None


def chunk_encoder(keyring: Keyring, source: Source) -> ChunkEncoder:
    """The per-process encoder for a source: its id space, its privacy policy, its escrow."""
    policy = source.privacy
    tokeniser = Tokeniser(keyring, id_space=source.id_space, record_new=policy.escrow)
    shifter = DateShifter(keyring, policy.date_shift_days) if policy.date_shift_days else None
    pseudonymiser = ResourcePseudonymiser(tokeniser, policy, date_shifter=shifter)
    escrow = EscrowCipher(keyring) if policy.escrow else None
    return ChunkEncoder(pseudonymiser, escrow, strict=source.quality.strict, rules=source.quality.strict_rules)


def _start_worker(keyring: Keyring, source: Source, niceness: int) -> None:
    global _worker
    os.nice(niceness)
    _worker = chunk_encoder(keyring, source)


def _encode_in_worker(file_no: int, expected_type: str, lines: list[tuple[int, bytes]]) -> EncodedChunk:
    return _worker.encode(file_no, expected_type, lines)


def _encode_range_in_worker(
    path: str,
    start: int,
    end: int,
    first_line: int,
    file_no: int,
    expected_type: str,
    rows_folder: str | None,
    part: int,
) -> EncodedChunk:
    """Read a run of whole lines of the file and encode them; the rows are appended to this worker's file of the
    part when there is a folder for them."""
    chunk = _worker.encode(file_no, expected_type, lines_of_range(path, start, end, first_line))
    if rows_folder is None:
        return chunk
    rows_file = f"{rows_folder}/{file_no}.{part}.{os.getpid()}.rows"
    with open(rows_file, "ab") as handle:
        handle.write(chunk.data)
    return dataclasses.replace(chunk, data=b"", rows_file=rows_file, part=part)


def lines_of_range(path: str | Path, start: int, end: int, first_line: int) -> list[tuple[int, bytes]]:
    """(line number, raw bytes) of the non-blank lines of a byte range that starts and ends at line breaks."""
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    return [(number, raw) for number, raw in enumerate(data.split(b"\n"), start=first_line) if raw.strip()]


def release_free_memory() -> None:
    """Give the heap's free pages back to the system. Megabyte-sized chunks come and go all the batch long and
    leave the heap fragmented: without this, resident memory would creep with the size of the delivery. A no-op
    where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - it exists, or this is not glibc
    except (OSError, AttributeError):
        return None
    return libc
