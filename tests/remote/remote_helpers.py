"""Helpers shared by the remote tests: the test dataset and views of the cache from outside."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import numpy as np

from streamshards import ShardWriter
from streamshards.storage.flock import flocked

COLUMNS = {"id": "int64", "tokens": "ndarray:uint16:512", "text": "str"}


def sample(i: int) -> dict:
    """Sample ``i`` of the test dataset: random tokens (so shards do not compress away)."""
    rng = np.random.default_rng(i)
    return {"id": i, "tokens": rng.integers(0, 65535, 512, dtype=np.uint16), "text": f"doc {i}"}


def write_dataset(folder: Path, samples: int, shard_bytes: int) -> Path:
    with ShardWriter(folder, COLUMNS, size_limit=shard_bytes) as writer:
        for i in range(samples):
            writer.write(sample(i))
    return folder


def wait_until(predicate, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def cache_snapshot(local: Path, names: set[str]) -> tuple[int, int]:
    """(bytes in the cache, bytes of shards in use), taken under the cache lock, per
    docs/STORAGE.md: a shard is in use while its .use lock is held; a .part is in flight.
    Locks are taken with the library's fork-safe ``flocked``: loader workers fork meanwhile."""
    total = in_use = 0
    with flocked(local / ".locks" / "cache", fcntl.LOCK_EX):
        for entry in os.scandir(local):
            if entry.name in names or entry.name.endswith(".part"):
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:  # a download renamed into place meanwhile
                    continue
                total += size
                shard = entry.name if entry.name in names else entry.name[1:-5]
                with flocked(
                    local / ".locks" / f"{shard}.use", fcntl.LOCK_EX | fcntl.LOCK_NB
                ) as idle:
                    in_use += size if idle is None else 0
    return total, in_use


class CacheMonitor:
    """Samples the cache in a thread and records the worst excess over limit + in use."""

    def __init__(self, local: Path, names: set[str], limit: int):
        self.local, self.names, self.limit = local, names, limit
        self.worst = -limit
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total, in_use = cache_snapshot(self.local, self.names)
            self.worst = max(self.worst, total - self.limit - in_use)
            self.samples += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
