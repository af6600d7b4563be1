"""RemoteSource: a remote dataset mirrored into a cache folder shared by a whole node (S2-S5).

Every rank and data-loader worker on a machine points at the same folder and coordinates
through ``flock`` locks only, which the kernel drops when a process dies:

    LOCAL/index.json          the remote index, fetched once per node (atomic rename)
    LOCAL/<shard>             complete shards, renamed in only after their hash matched, and
                              stamped verified (streamshards.verify); atime is the LRU clock
    LOCAL/.<shard>.part       a download in progress, or one left by a killed process
    LOCAL/.locks/cache        exclusive: index fetch, space accounting, eviction
    LOCAL/.locks/<shard>.get  exclusive: the one download of this shard
    LOCAL/.locks/<shard>.use  shared: held by every process reading (or prefetching) the shard

A lock file's existence never blocks anything; only a held lock does. docs/STORAGE.md has
the protocol and the eviction rule.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import multiprocessing.util
import os
import tempfile
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

from streamshards.format import ShardError
from streamshards.index import (
    INDEX_NAME,
    Index,
    IndexFormatError,
    ShardInfo,
    parse_index_bytes,
)
from streamshards.sources.base import ShardSource, read_index
from streamshards.storage import Progress, RetryPolicy, Storage, open_storage
from streamshards.storage.flock import close_lock, flocked, is_current, open_lock
from streamshards.util import atomic_write, parse_size
from streamshards.verify import (
    check_shard,
    is_verified,
    mark_verified,
    settle,
    verify_and_mark,
)

log = logging.getLogger(__name__)
LOCK_DIR = ".locks"
DOWNLOAD_TRIES = 2


def default_cache_dir(remote: str) -> Path:
    """A cache folder under the system temp folder, the same for every process on the node."""
    key = hashlib.sha256(remote.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "streamshards-cache" / key


def download_verified(
    storage: Storage, info: ShardInfo, f: BinaryIO, progress: Progress = None
) -> None:
    """Download a shard into ``f`` until size and hash match the index, at most twice (S2)."""
    url = storage.url_of(info.file)
    for attempt in range(1, DOWNLOAD_TRIES + 1):
        storage.read_into(info.file, f, progress=progress)
        try:
            check_shard(f, info, url)
            return
        except ShardError as err:
            if attempt == DOWNLOAD_TRIES:
                raise ShardError(f"{err} (after {DOWNLOAD_TRIES} downloads)") from None
            log.warning("%s (download %d of %d)", err, attempt, DOWNLOAD_TRIES)


def _touch(path: Path) -> bool:
    """Advance the LRU clock (atime) of a cached shard; mtime stays, and with it the stamp.
    False if the file is gone (the cache folder was wiped)."""
    try:
        os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
    except FileNotFoundError:
        return False
    return True


class RemoteSource(ShardSource):
    """Shards of ``remote`` fetched on demand and ahead of time into the node cache ``local``.

    ``cache_limit`` (bytes or "20GB"; None = unlimited) bounds the folder: it exceeds the limit
    by at most the shards some process is reading. ``prefetch`` is both the number of download
    threads and how many hinted shards this process fetches ahead of its reads.
    """

    def __init__(
        self,
        remote: str,
        local: str | os.PathLike | None = None,
        cache_limit: int | str | None = None,
        prefetch: int = 4,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        **options: Any,
    ):
        self.remote = str(remote)
        self.options = options  # for an MDS or LitData dataset (streamshards.interop)
        self.storage: Storage = open_storage(self.remote, retry, timeout)
        self.local = Path(local) if local is not None else default_cache_dir(self.remote)
        self.cache_limit = parse_size(cache_limit)
        if self.cache_limit is not None and self.cache_limit < 0:
            raise ValueError(f"cache_limit must be positive, got {cache_limit!r}")
        self.prefetch_depth = max(0, int(prefetch))
        (self.local / LOCK_DIR).mkdir(parents=True, exist_ok=True)
        self.index = self._load_index()
        if self.cache_limit is not None:
            largest = max((s.stored_bytes for s in self.index.shards), default=1)
            self.max_open = max(2, self.cache_limit // max(1, largest))
        self._reset_process_state()
        self.complete_foreign()

    # -- per-process state: rebuilt after fork or unpickling, never shared between processes
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._holds: dict[int, int] = {}  # shard -> fd holding LOCK_SH on its .use file
        self._refs: Counter[int] = Counter()  # path() calls not yet released
        self._pinned: set[int] = set()  # held for prefetch, not yet asked for by path()
        self._inflight: set[int] = set()
        self._wanted: list[int] = []
        self._threads: list[threading.Thread] = []
        self._waited = 0.0
        self._closed = False
        # Loader workers end without closing their dataset: release (and trim) at exit.
        multiprocessing.util.Finalize(
            None, _close_at_exit, args=(weakref.ref(self),), exitpriority=10
        )

    def _ensure_process(self) -> None:
        if self._pid != os.getpid():  # forked: the lock descriptors are closed already
            self._session = None
            self._reset_process_state()

    def __getstate__(self) -> dict:
        keep = ("remote", "storage", "local", "cache_limit", "prefetch_depth", "index", "_sizes")
        keep += ("foreign",)
        return {name: self.__dict__[name] for name in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._session = None
        self._reset_process_state()

    # -- paths of the cache layout
    def _lock_path(self, name: str, kind: str) -> Path:
        return self.local / LOCK_DIR / (f"{name}.{kind}" if kind else name)

    def _cache_lock(self):
        return flocked(self._lock_path("cache", ""), fcntl.LOCK_EX)

    def _load_index(self) -> Index:
        """The index, fetched once per node and run.

        Every live RemoteSource holds a shared lock on ``.locks/session``. A process that
        finds no other holder starts a new run: it fetches index.json again (the remote may
        have changed since the cache was filled) and drops cached shards it no longer lists.
        Later processes of the same run read the local copy.
        """
        path = self.local / INDEX_NAME
        with self._cache_lock():
            self._session = open_lock(self._lock_path("session", ""))
            try:
                index = self._read_or_fetch_index(path)
            except BaseException:
                close_lock(self._session)
                raise
            fcntl.flock(self._session, fcntl.LOCK_SH)  # safe: starters take the cache lock first
            self._sizes = {info.file: info.stored_bytes for info in index.shards}
            self._scan(evict_to=self.cache_limit)  # also trims what killed processes left
        return index

    def _read_or_fetch_index(self, path: Path) -> Index:
        try:
            fcntl.flock(self._session, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process of this run is alive: share its index
            if path.exists():
                return self._parse_index(path.read_bytes(), str(path))
        data = self.storage.get_bytes(INDEX_NAME)
        index = self._parse_index(data, self.storage.url_of(INDEX_NAME))
        old = path.read_bytes() if path.exists() else None
        if data != old:
            self._drop_stale_shards(index, old)
            atomic_write(path, data)
        return index

    def _parse_index(self, data: bytes, source: str) -> Index:
        """A native index, or an MDS or LitData one (``self.foreign`` then reads its shards)."""
        index, self.foreign = read_index(data, source, self.options)
        nested = [s.file for s in index.shards if "/" in s.file]
        if nested:
            raise IndexFormatError(
                f"{source}: shard {nested[0]!r} lies in a subfolder; the node cache keeps shards "
                "in one folder, so read this dataset from a local copy"
            )
        return index

    def _drop_stale_shards(self, index: Index, old_index: bytes | None) -> None:
        """Remove cached shards that the new index does not list with the same size and hash."""
        wanted = {info.file: info for info in index.shards}
        old = None
        if old_index is not None:
            try:
                old = {s.file: s for s in parse_index_bytes(old_index, "old index").shards}
            except IndexFormatError:
                pass
        for name in set(wanted) | set(old or ()):
            target = self.local / name
            if not target.exists():
                continue
            info = wanted.get(name)
            if info is not None and old is not None and old.get(name) == info:
                continue  # verified against the old index, which says the same
            if info is not None and old is None:
                try:
                    verify_and_mark(target, info)
                    continue
                except ShardError:
                    pass
            log.info("cache %s: dropping %s, not in the current index", self.local, name)
            target.unlink()

    # -- the consumer interface
    def path(self, shard: int) -> Path:
        """The verified local file of ``shard``, downloading it (once per node) if needed.

        The shard stays protected from eviction until ``release(shard)``.
        """
        self._ensure_process()
        info = self.index.shards[shard]
        target = self.local / info.file
        start = time.perf_counter()
        with self._cond:
            self._refs[shard] += 1
            if shard in self._pinned:
                self._pinned.discard(shard)
                self._cond.notify_all()  # room to fetch one more ahead
        try:
            self._hold(shard)
            if not (is_verified(target, info) and _touch(target)):
                self._fetch(info, required=True)
        except BaseException:
            self.release(shard)
            raise
        finally:
            self._waited += time.perf_counter() - start
        return target

    def release(self, shard: int) -> None:
        """This process stops reading ``shard``: unprotect it and trim the cache to its limit."""
        self._ensure_process()
        with self._cond:
            if self._refs[shard] > 0:
                self._refs[shard] -= 1
            if self._refs[shard] == 0:
                del self._refs[shard]
            fd = self._unheld(shard)
        if fd is not None:
            self._drop(fd)

    def prefetch(self, shards: list[int]) -> None:
        """Fetch these shards ahead, in order, in background threads; replaces earlier hints."""
        self._ensure_process()
        if self.prefetch_depth == 0:
            return
        hinted = list(dict.fromkeys(int(k) for k in shards))
        dropped = []
        with self._cond:
            keep = set(hinted)
            for k in [k for k in self._pinned if k not in keep and k not in self._inflight]:
                self._pinned.discard(k)
                dropped.append(self._unheld(k))
            self._wanted = [k for k in hinted if k not in self._pinned and k not in self._refs]
            while len(self._threads) < self.prefetch_depth:
                thread = threading.Thread(
                    target=self._prefetch_loop,
                    daemon=True,
                    name=f"streamshards-prefetch-{len(self._threads)}",
                )
                thread.start()
                self._threads.append(thread)
            self._cond.notify_all()
        for fd in dropped:
            if fd is not None:
                self._drop(fd)

    def wait_seconds(self) -> float:
        """Seconds this process spent inside ``path``: waiting on downloads or other processes."""
        return self._waited

    def close(self, wait: bool = True) -> None:
        """Stop prefetching and release every shard this process holds, trimming the cache.

        ``wait=False`` leaves downloads in flight to die with the process (used at exit).
        """
        self._ensure_process()
        with self._cond:
            self._closed = True
            self._wanted = []
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()
        with self._cond:
            fds = [fd for k, fd in self._holds.items() if k not in self._inflight]
            self._holds = {k: fd for k, fd in self._holds.items() if k in self._inflight}
            self._refs.clear()
            self._pinned &= self._inflight
        for fd in fds:
            self._drop(fd)
        if self._session is not None:
            close_lock(self._session)
            self._session = None

    def __del__(self) -> None:
        # A source dropped without close() must not keep shards pinned in a shared cache.
        if getattr(self, "_pid", None) == os.getpid() and not self._threads:
            try:
                self.close()
            except Exception:  # interpreter shutdown: the kernel releases the locks anyway
                pass

    def __enter__(self) -> RemoteSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- holds: LOCK_SH on the shard's .use file while this process reads or prefetches it
    def _hold(self, shard: int) -> None:
        if shard in self._holds:
            return
        fd = open_lock(self._lock_path(self.index.shards[shard].file, "use"))
        fcntl.flock(fd, fcntl.LOCK_SH)
        with self._cond:
            if shard in self._holds:
                close_lock(fd)  # another thread of this process got there first
            else:
                self._holds[shard] = fd

    def _unheld(self, shard: int) -> int | None:
        """Under the condition lock: take the hold's fd out if nothing in this process needs it."""
        if shard in self._refs or shard in self._pinned:
            return None
        return self._holds.pop(shard, None)

    def _drop(self, fd: int) -> None:
        """Release a hold; with a limit, trim the cache in the same critical section."""
        if self.cache_limit is None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            close_lock(fd)
            return
        with self._cache_lock():
            fcntl.flock(fd, fcntl.LOCK_UN)
            close_lock(fd)
            self._scan(evict_to=self.cache_limit)

    # -- downloading
    def _fetch(self, info: ShardInfo, required: bool) -> bool:
        """Download one shard unless a verified copy is present; returns False if a prefetch
        found no room. A cached copy damaged on local disk is dropped and fetched again."""
        try:
            return self._fetch_locked(info, required)
        except FileNotFoundError:  # the cache folder was wiped under the download
            log.warning("cache %s vanished; fetching %s again", self.local, info.file)
            return self._fetch_locked(info, required)

    def _fetch_locked(self, info: ShardInfo, required: bool) -> bool:
        """``_fetch`` under the shard's .get lock. A lock file deleted with the cache folder no
        longer excludes anyone, so the download stops (FileNotFoundError) if that happened,
        leaving the .part to whoever holds the new lock."""
        target = self.local / info.file
        part = self.local / f".{info.file}.part"
        lock = self._lock_path(info.file, "get")
        with flocked(lock, fcntl.LOCK_EX) as fd:
            if target.exists():
                try:
                    verify_and_mark(target, info)
                    if _touch(target):
                        return True
                except ShardError as err:
                    log.warning("cache %s: %s; fetching it again", self.local, err)
                    _unlink_quietly(target)
            if self.cache_limit is not None:
                with self._cache_lock():
                    room = self._scan(evict_to=self.cache_limit - info.stored_bytes)
                    if not room and not required:
                        return False
                    part.touch()  # visible to other processes' accounting from now on
            _check_held(fd, lock)
            try:
                with open(part, "w+b") as f:
                    download_verified(self.storage, info, f)
                    mark_verified(f.fileno(), info, settle(f.fileno()))
                _check_held(fd, lock)
                os.replace(part, target)
            except BaseException:
                if is_current(fd, lock):
                    part.unlink(missing_ok=True)
                raise
        return True

    def _prefetch_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (
                    self._wanted and len(self._pinned) < self.prefetch_depth
                ):
                    self._cond.wait()
                if self._closed:
                    return
                shard = self._wanted.pop(0)
                self._pinned.add(shard)
                self._inflight.add(shard)
            fetched = False
            try:
                self._hold(shard)
                fetched = self._fetch(self.index.shards[shard], required=False)
            except Exception as err:  # the consumer's own path() call will retry and report
                log.info("prefetch of shard %d failed: %s", shard, err)
            with self._cond:
                self._inflight.discard(shard)
                if not fetched:
                    self._pinned.discard(shard)
                fd = self._unheld(shard)
                self._cond.notify_all()
            if fd is not None:
                self._drop(fd)

    # -- accounting and eviction, always under the cache lock
    def _scan(self, evict_to: int | None = None) -> bool:
        """Clean stale temporaries; evict LRU idle shards until the cache is <= ``evict_to``.

        The size counts complete shards and in-progress downloads at their full size. Returns
        whether the target was met (always True without a target).
        """
        shards: list[tuple[float, str, int]] = []
        total = 0
        with os.scandir(self.local) as entries:
            for entry in entries:
                name = entry.name
                if name in self._sizes:
                    stat = entry.stat()
                    shards.append((stat.st_atime, name, stat.st_size))
                    total += stat.st_size
                elif name.startswith(".") and name.endswith(".part") and name[1:-5] in self._sizes:
                    with flocked(
                        self._lock_path(name[1:-5], "get"), fcntl.LOCK_EX | fcntl.LOCK_NB
                    ) as fd:
                        if fd is not None:  # nobody downloads it: left by a killed process
                            _unlink_quietly(entry.path)
                        else:
                            total += self._sizes[name[1:-5]]
                elif name.startswith(f".{INDEX_NAME}.") and name.endswith(".tmp"):
                    _unlink_quietly(entry.path)  # index writes happen under this same lock
        if evict_to is None or total <= evict_to:
            return True
        for _, name, size in sorted(shards):
            with flocked(self._lock_path(name, "use"), fcntl.LOCK_EX | fcntl.LOCK_NB) as fd:
                if fd is None:
                    continue  # some process reads it: never evicted under a reader
                _unlink_quietly(self.local / name)
                total -= size
            if total <= evict_to:
                return True
        return False


def _close_at_exit(source: weakref.ref) -> None:
    alive = source()
    if alive is not None and alive._pid == os.getpid():
        alive.close(wait=False)


def _check_held(fd: int | None, lock: Path) -> None:
    if not is_current(fd, lock):
        raise FileNotFoundError(errno.ENOENT, "lock file deleted (cache folder wiped)", str(lock))


def _unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise
