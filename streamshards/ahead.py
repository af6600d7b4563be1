"""Compressed shards opened on threads before the in-process reader needs them.

Decompressing is most of the cost of reading a zstd shard, and zstandard releases the GIL, so
while the reader works through one shard, threads decompress the next ones in the order's
prefetch hint. Only the process that started the threads uses them: a forked or spawned
DataLoader worker starts with none and opens shards itself, as its siblings share the cores.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from streamshards.format import ShardView
from streamshards.sources.base import ShardSource

Key = tuple[int, int]  # (stream, shard)
# Views opened or being opened ahead, per thread: enough that a shuffled chunk spread over
# many shards keeps the threads busy while the reader waits on one, few enough that a hint
# touching thousands of small shards does not open them all.
VIEWS_PER_THREAD = 8


def usable_cores() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OpenAhead:
    """Views of hinted shards, opened by up to ``threads`` threads while the reader works.

    Shards are opened with ``sources[stream].open_view(shard)``. At most ``threads`` are being
    opened at once and ``VIEWS_PER_THREAD`` times that many opened or being opened ahead,
    holding at most ``max_bytes`` (one view whatever its size). A view opened ahead is handed
    over once by ``take``; an error opening it is raised there, where the reader would have
    met it.
    """

    def __init__(self, sources: Sequence[ShardSource], threads: int, max_bytes: int):
        self.sources = sources
        self.threads = threads
        self.max_bytes = max_bytes
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._pool: ThreadPoolExecutor | None = None
        self._queue: OrderedDict[Key, int] = OrderedDict()  # hinted, not started: raw bytes
        self._pending: dict[Key, tuple[Future[ShardView], int]] = {}
        self._lock = threading.RLock()  # the reader and the threads' completions both refill

    @property
    def _held(self) -> int:
        """Raw bytes of the views opened or being opened ahead."""
        return sum(size for _, size in self._pending.values())

    def _mine(self) -> bool:
        """Whether this process started the threads; after a fork, forget the parent's work."""
        if self._pid != os.getpid():
            self._start()
        return self.threads > 0

    def want(self, keys: list[tuple[Key, int]]) -> None:
        """Queue shards (key, raw bytes) that the reader will need, in the order it needs them."""
        if not self._mine():
            return
        with self._lock:
            for key, size in keys:
                if key not in self._pending:
                    self._queue.setdefault(key, size)
            self._fill()

    def take(self, key: Key) -> ShardView | None:
        """The view of ``key`` if it was opened ahead (waiting for it if under way), else None:
        the caller opens it, while the threads go on with the queue."""
        if not self._mine():
            return None
        with self._lock:
            self._queue.pop(key, None)
            started = self._pending.pop(key, None)
            self._fill()
        return None if started is None else started[0].result()

    def _fill(self) -> None:
        """Start queued shards while a thread is free and the views held ahead fit; runs again
        as each finishes, so the threads never wait for the reader."""
        with self._lock:
            while self._queue and len(self._pending) < VIEWS_PER_THREAD * self.threads:
                if sum(not future.done() for future, _ in self._pending.values()) >= self.threads:
                    return
                key, size = next(iter(self._queue.items()))
                if self._pending and self._held + size > self.max_bytes:
                    return
                del self._queue[key]
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="streamshards")
                stream, shard = key
                try:
                    future = self._pool.submit(self.sources[stream].open_view, shard)
                except RuntimeError:  # the interpreter is exiting: open nothing more
                    self._queue.clear()
                    return
                self._pending[key] = (future, size)
                future.add_done_callback(lambda _: self._fill())
