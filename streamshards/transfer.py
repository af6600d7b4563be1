"""Publishing datasets to a remote and copying them back (S6), and writing straight to a remote.

Shards go up in parallel (multipart when big) with their xxh3-64 in the object metadata;
a shard whose size and hash already match the remote is skipped, so an interrupted upload
resumes where it stopped. index.json goes last, and no object the remote's current index
names is ever overwritten with other bytes (such a shard goes up under a name carrying its
hash): at every instant readers see the old dataset or the whole new one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import xxhash
from tqdm import tqdm

from streamshards.format import ShardError
from streamshards.index import (
    INDEX_NAME,
    Index,
    IndexFormatError,
    ShardInfo,
    index_bytes,
    load_index,
    parse_index_bytes,
)
from streamshards.sources.remote import download_verified
from streamshards.storage import NotFoundError, ObjectInfo, Storage, StorageError, open_storage
from streamshards.util import atomic_file, atomic_write, fsync_folder
from streamshards.verify import check_shard, mismatch
from streamshards.writer import ShardWriter


@dataclass(frozen=True)
class TransferReport:
    """What an upload or download did."""

    files: int
    skipped: int
    bytes: int
    seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class _Bar:
    """A thread-safe byte progress bar (tqdm shows the rate in bytes/s)."""

    def __init__(self, total: int, desc: str, show: bool):
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not show)
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _remote_index(storage: Storage) -> dict[str, ShardInfo]:
    """Shards the remote's current index lists, by file name; empty if it has none."""
    try:
        data = storage.get_bytes(INDEX_NAME)
    except NotFoundError:
        return {}
    try:
        return {s.file: s for s in parse_index_bytes(data, storage.url_of(INDEX_NAME)).shards}
    except IndexFormatError:
        return {}


def _already_there(
    storage: Storage, info: ShardInfo, objects: dict[str, ObjectInfo], listed: dict[str, ShardInfo]
) -> bool:
    """Whether the remote holds this exact shard: same size and same recorded xxh3-64."""
    obj = objects.get(info.file)
    if obj is None or obj.size != info.stored_bytes:
        return False
    entry = listed.get(info.file)
    if obj.xxh3_64 == info.hash or entry == info:
        return True
    return obj.xxh3_64 is None and storage.stat(info.file).xxh3_64 == info.hash


def _check_local(folder: Path, info: ShardInfo) -> Path:
    """The local shard file, refused if it does not match its index entry."""
    path = folder / info.file
    check_shard(path, info)
    return path


def _published_as(info: ShardInfo, listed: dict[str, ShardInfo]) -> ShardInfo:
    """The entry under which a shard is published: its own name, unless the remote's current
    index names that object with other content; then a name carrying the shard's hash, so the
    dataset readers see now is never changed under them."""
    entry = listed.get(info.file)
    if entry is None or entry == info:
        return info
    parts = info.file.split(".")
    at = next((i for i in range(1, len(parts)) if not parts[i].isdigit()), len(parts))
    return info._replace(file=".".join([*parts[:at], info.hash, *parts[at:]]))


def _index_to_publish(index: Index, data: bytes, published: list[ShardInfo]) -> bytes:
    """``data`` (the local index.json) as is, or rewritten to name the renamed shards."""
    if published == index.shards:
        return data
    return index_bytes(dataclasses.replace(index, shards=published))


def upload(
    local: str | os.PathLike, remote: str, workers: int = 8, progress: bool = True
) -> TransferReport:
    """Publish the dataset folder ``local`` to ``remote``; index.json is uploaded last.

    Over an existing dataset, shards whose names it uses for other bytes go up under new names
    (see ``_published_as``), so the old dataset stays whole until the new index replaces it.
    """
    start = time.perf_counter()
    folder = Path(local)
    index = load_index(folder)
    data = (folder / INDEX_NAME).read_bytes()
    storage = open_storage(remote)
    try:
        objects = {o.name: o for o in storage.list()}
    except NotFoundError:
        objects = {}  # a local destination folder that does not exist yet
    listed = _remote_index(storage) if INDEX_NAME in objects else {}
    published = [_published_as(info, listed) for info in index.shards]
    bar = _Bar(index.stored_bytes, "upload", progress)

    def send(pair: tuple[ShardInfo, ShardInfo]) -> bool:
        info, target = pair
        if _already_there(storage, target, objects, listed):
            bar(info.stored_bytes)
            return False
        storage.put(_check_local(folder, info), target.file, info.hash, bar)
        return True

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            sent = list(pool.map(send, zip(index.shards, published, strict=True)))
        storage.put_bytes(_index_to_publish(index, data, published), INDEX_NAME)
    finally:
        bar.close()
    return _report(index, sent, start)


def download(
    remote: str, local: str | os.PathLike, workers: int = 8, progress: bool = True
) -> TransferReport:
    """Copy the dataset at ``remote`` into the folder ``local``, verified; index.json last.

    A different index already in ``local`` is removed first, so that no reader ever sees an
    index naming shards that are being replaced.
    """
    start = time.perf_counter()
    storage = open_storage(remote)
    data = storage.get_bytes(INDEX_NAME)
    index = parse_index_bytes(data, storage.url_of(INDEX_NAME))
    folder = Path(local)
    folder.mkdir(parents=True, exist_ok=True)
    old = folder / INDEX_NAME
    if old.is_file() and old.read_bytes() != data:
        old.unlink()
        fsync_folder(folder)
    bar = _Bar(index.stored_bytes, "download", progress)

    def fetch(info: ShardInfo) -> bool:
        try:
            _check_local(folder, info)
            bar(info.stored_bytes)
            return False
        except (OSError, ShardError):
            pass  # missing or different: download it
        with atomic_file(folder / info.file) as f:
            download_verified(storage, info, f, bar)
        return True

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            fetched = list(pool.map(fetch, index.shards))
        atomic_write(folder / INDEX_NAME, data)
    finally:
        bar.close()
    return _report(index, fetched, start)


def _report(index: Index, moved: list[bool], start: float) -> TransferReport:
    size = sum(info.stored_bytes for info, done in zip(index.shards, moved, strict=True) if done)
    return TransferReport(sum(moved), len(moved) - sum(moved), size, time.perf_counter() - start)


class RemoteWriter:
    """A ShardWriter that publishes to ``remote``: each shard is uploaded once finished, the
    index last, on close. Shards are staged in ``staging`` (a temp folder by default).

    >>> with RemoteWriter("s3://bucket/web-v1", {"tokens": "ndarray:uint16:2048"}) as w:
    ...     w.write({"tokens": tokens})
    """

    def __init__(
        self,
        remote: str,
        columns: Mapping[str, str],
        staging: str | os.PathLike | None = None,
        keep_local: bool = False,
        upload_workers: int = 4,
        overwrite: bool = False,
        **writer_options: Any,
    ):
        self.storage = open_storage(remote)
        if not overwrite and self.storage.exists(INDEX_NAME):
            raise FileExistsError(
                f"{self.storage.url_of(INDEX_NAME)} exists; pass "
                "overwrite=True to replace that dataset"
            )
        self._listed = _remote_index(self.storage) if overwrite else {}
        self._published: dict[str, ShardInfo] = {}
        self._temp = None if staging is not None else tempfile.mkdtemp(prefix="streamshards-")
        self.staging = Path(staging if staging is not None else self._temp)
        self.keep_local = keep_local
        self.writer = ShardWriter(self.staging, columns, overwrite=overwrite, **writer_options)
        self._workers = max(1, upload_workers)
        self._pool = ThreadPoolExecutor(self._workers)
        self._pending: list[Future] = []
        self._sent = 0

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample (see ShardWriter.write); finished shards start uploading."""
        self.writer.write(sample)
        self._send_finished()

    def write_encoded(self, encoded: list[bytes]) -> None:
        """Add one already-encoded sample (see ShardWriter.write_encoded)."""
        self.writer.write_encoded(encoded)
        self._send_finished()

    def _send(self, info: ShardInfo) -> None:
        path = self.staging / info.file
        target = _published_as(info, self._listed)
        self.storage.put(path, target.file, info.hash)
        self._published[info.file] = target
        if not self.keep_local:
            path.unlink()

    def _send_finished(self) -> None:
        while self._sent < len(self.writer.shards):
            self._pending.append(self._pool.submit(self._send, self.writer.shards[self._sent]))
            self._sent += 1
        # Back-pressure: never stage more than two shards per upload thread.
        while len(self._pending) > 2 * self._workers or self._pending and self._pending[0].done():
            self._pending.pop(0).result()

    def close(self) -> Index:
        """Finish the last shard, wait for every upload, then publish index.json."""
        index = self.writer.close()
        try:
            self._send_finished()
            while self._pending:
                self._pending.pop(0).result()
            published = [self._published[info.file] for info in index.shards]
            data = (self.staging / INDEX_NAME).read_bytes()
            self.storage.put_bytes(_index_to_publish(index, data, published), INDEX_NAME)
        finally:
            self._shutdown()
        return index

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)

    def __enter__(self) -> RemoteWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # no index is published: the remote does not become a dataset
            self.writer.__exit__(exc_type, exc, tb)
            self._shutdown()


class _HashingSink:
    """A write-only file that hashes what it is given: streams an object without touching disk.

    ``Storage.read_into`` rewinds it before each try, which starts the hash over.
    """

    def __init__(self) -> None:
        self.seek(0)

    def seek(self, offset: int, whence: int = 0) -> int:
        if offset or whence:
            raise OSError("a hashing sink can only be rewound to its start")
        self._hash, self._size = xxhash.xxh3_64(), 0
        return 0

    def truncate(self, size: int | None = None) -> int:
        return self._size

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._size += len(data)
        return len(data)

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def verify_remote(
    remote: str, workers: int = 8
) -> tuple[Index, Iterator[tuple[ShardInfo, str | None]]]:
    """The remote's index, and (shard, problem or None) for each shard in index order.

    Checks the objects themselves, not a cache: an object longer than the index says is
    found from a HEAD request alone; others are streamed through xxh3-64, ``workers`` at a
    time.
    """
    storage = open_storage(remote)
    index = parse_index_bytes(storage.get_bytes(INDEX_NAME), storage.url_of(INDEX_NAME))

    def check(info: ShardInfo) -> tuple[ShardInfo, str | None]:
        url = storage.url_of(info.file)
        try:
            size = storage.stat(info.file).size
            if size > info.stored_bytes:
                return info, mismatch(info, url, size, None)
            sink = _HashingSink()
            size = storage.read_into(info.file, sink)  # type: ignore[arg-type]
            return info, mismatch(info, url, size, sink.hexdigest())
        except StorageError as err:
            return info, str(err)

    def results() -> Iterator[tuple[ShardInfo, str | None]]:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            yield from pool.map(check, index.shards)

    return index, results()
