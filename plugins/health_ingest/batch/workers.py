"""The concurrency every loader shares: worker processes whose results come back in file order, stage threads that
pass typed messages down queues and stop one way, and a merge kept or undone under a savepoint."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from health_ingest import config
from health_ingest.warehouse.connection import release_inherited_connections

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it ends

log = logging.getLogger(__name__)


class WorkerPool:
    """Worker processes forked from the batch's process (they inherit its loaded modules and settings), each set up
    by `initializer` once and run at the configured priority; none when there is one worker (`parallel` is False).
    At most two tasks per worker are in flight, so memory does not grow with the file. Use as a context manager:
    the workers stop with it, and die with the thread that made them (`_die_with_parent`): the pool must not
    outlive the thread that first uses it."""

    def __init__(self, initializer: Callable[..., None], initargs: tuple, workers: int | None = None) -> None:
        self.workers = workers if workers is not None else config.workers()
        if self.workers > 1 and multiprocessing.current_process().daemon:
            # a daemonic process (a task of Celery's prefork pool) may not start processes: read in this one
            log.warning(
                "the batch runs in a daemonic process, which may not start worker processes: reading in the "
                "batch's own process (run Celery workers with the solo pool to use every core)"
            )
            self.workers = 1
        self.niceness = config.worker_niceness()
        self._initializer, self._initargs = initializer, initargs
        self._pool: ProcessPoolExecutor | None = None

    @property
    def parallel(self) -> bool:
        return self._pool is not None

    def __enter__(self):
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(os.getpid(), self.niceness, self._initializer, self._initargs),
            )
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def in_order(self, tasks: Iterable[tuple], stop: threading.Event | None = None) -> Iterator[Any]:
        """Each task's result, in the order of the tasks (a task is a function and its arguments); a result is
        handed on as soon as those before it are, and no task is sent once `stop` is set."""
        in_flight: deque[Future] = deque()
        for function, *args in tasks:
            if stop is not None and stop.is_set():
                return
            in_flight.append(self._pool.submit(function, *args))
            while len(in_flight) >= 2 * self.workers or (in_flight and in_flight[0].done()):
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


class Stages:
    """Threads that each run one stage of a load and hand typed messages to the next down queues: an item, a
    `lifecycle.StageFailure` (the error and where the stage was, raised again by the load transaction), or None at
    the end. `close` stops them all the same way: every put and get gives up once `stop` is set."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def put(self, channel: queue.Queue, item: object) -> bool:
        """Hand an item to the next stage, unless the batch has stopped (then False)."""
        while not self.stop.is_set():
            try:
                channel.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def next(self, channel: queue.Queue):
        """The next item from the stage before (a `StageFailure` included); None at the end or once stopped."""
        while not self.stop.is_set():
            try:
                return channel.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()


class SavepointMerge:
    """A table's merge as its parts come: plain inserts while every key is new, under a savepoint, so that when a key
    is met again (stored by an earlier batch, or twice in the delivery) what the inserts did can be undone and the
    table merged by its upsert rules instead. A table new to the warehouse is made without its key and indexes,
    which are built once its rows are in (`build_key` False: a key came twice)."""

    def __init__(self, cur, name: str, *, unindexed: bool = False) -> None:
        self.cur, self.name = cur, name
        self.inserting = True  # every part so far plainly inserted
        self.unindexed = unindexed  # made by this batch: its key and indexes come at its end
        self.cur.execute(f"SAVEPOINT {name}")

    def undo(self) -> None:
        """Roll the table back to before its first part; from now on it is merged by key."""
        self.cur.execute(f"ROLLBACK TO SAVEPOINT {self.name}")
        self.inserting = False

    def finish(self, clean: bool, build_key: Callable[[], bool], merge_whole: Callable[[], None]) -> None:
        """Keep the inserts when they were `clean` (and the key of a new table could be built); else undo them
        and `merge_whole` the table by its upsert rules."""
        if clean and self.unindexed:
            clean = build_key()
        if not clean:
            self.undo()
            merge_whole()
        self.cur.execute(f"RELEASE SAVEPOINT {self.name}")


def release_free_memory() -> None:
    """Give the heap's free pages back to the system. Megabyte-sized chunks come and go all the batch long and
    leave the heap fragmented: without this, resident memory would creep with the size of the delivery. A no-op
    where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# --- implementation details -------------------------------------------------------------------


def _start_worker(parent: int, niceness: int, initializer: Callable[..., None], initargs: tuple) -> None:
    release_inherited_connections()  # the batch's sessions end with its process, not with the last of its workers
    _die_with_parent(parent)
    # workers yield to the database (staging, merging, checking the previous parts), which the batch waits for
    os.nice(niceness)
    initializer(*initargs)


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this worker when the thread that forked it ends: a worker has nothing to do once its
    batch is gone (it no longer holds the batch's sessions: `release_inherited_connections`). If the parent is
    already gone, exit now."""
    libc = _glibc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - it exists, or this is not glibc
    except (OSError, AttributeError):
        return None
    return libc
