"""Publishing datasets to a remote and copying them back (S6), and writing straight to a remote.

Shards go up in parallel (multipart when big) with their xxh3-64 in the object metadata;
a shard whose size and hash already match the remote is skipped, so an interrupted upload
resumes where it stopped. index.json goes last: readers see the old dataset or the whole
new one, never a half-uploaded one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import click
from tqdm import tqdm

from streamshards.cache import download_verified, file_hash
from streamshards.format import ShardError
from streamshards.index import (
    INDEX_NAME,
    Index,
    IndexFormatError,
    ShardInfo,
    atomic_file,
    atomic_write,
    load_index,
    parse_index_bytes,
)
from streamshards.storage import NotFoundError, ObjectInfo, Storage, StorageError, open_storage
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
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        actual = file_hash(f) if size == info.stored_bytes else None
    if actual != info.hash:
        raise ShardError(
            f"{path}: does not match {folder / INDEX_NAME}: index says "
            f"{info.stored_bytes} bytes with xxh3_64={info.hash}, file has "
            f"{size} bytes" + (f" with xxh3_64={actual}" if actual else "")
        )
    return path


def upload(
    local: str | os.PathLike, remote: str, workers: int = 8, progress: bool = True
) -> TransferReport:
    """Publish the dataset folder ``local`` to ``remote``; index.json is uploaded last."""
    start = time.perf_counter()
    folder = Path(local)
    index = load_index(folder)
    storage = open_storage(remote)
    try:
        objects = {o.name: o for o in storage.list()}
    except NotFoundError:
        objects = {}  # a local destination folder that does not exist yet
    listed = _remote_index(storage) if INDEX_NAME in objects else {}
    bar = _Bar(index.stored_bytes, "upload", progress)

    def send(info: ShardInfo) -> bool:
        if _already_there(storage, info, objects, listed):
            bar(info.stored_bytes)
            return False
        storage.put(_check_local(folder, info), info.file, info.hash, bar)
        return True

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            sent = list(pool.map(send, index.shards))
        storage.put_bytes((folder / INDEX_NAME).read_bytes(), INDEX_NAME)
    finally:
        bar.close()
    return _report(index, sent, start)


def download(
    remote: str, local: str | os.PathLike, workers: int = 8, progress: bool = True
) -> TransferReport:
    """Copy the dataset at ``remote`` into the folder ``local``, verified; index.json last."""
    start = time.perf_counter()
    storage = open_storage(remote)
    data = storage.get_bytes(INDEX_NAME)
    index = parse_index_bytes(data, storage.url_of(INDEX_NAME))
    folder = Path(local)
    folder.mkdir(parents=True, exist_ok=True)
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
        self.storage.put(path, info.file, info.hash)
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
            self.storage.put_bytes((self.staging / INDEX_NAME).read_bytes(), INDEX_NAME)
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


_ERRORS = (StorageError, IndexFormatError, ShardError, FileNotFoundError, ValueError)


def _summary(verb: str, report: TransferReport, where: str) -> str:
    return (
        f"{verb} {report.files} shards ({report.bytes / 1e6:.1f} MB, "
        f"{report.mb_per_second:.1f} MB/s), skipped {report.skipped} already there, {where}"
    )


@click.command("upload")
@click.argument("local")
@click.argument("remote")
@click.option("--workers", default=8, show_default=True, help="Files uploaded in parallel.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def upload_command(local: str, remote: str, workers: int, quiet: bool) -> None:
    """Publish a local dataset to a remote; files already there are skipped, index.json last.

    Example: streamshards upload ./shards s3://bucket/datasets/web-v1
    """
    try:
        report = upload(local, remote, workers, progress=not quiet)
    except _ERRORS as err:
        raise click.ClickException(str(err)) from None
    click.echo(_summary("uploaded", report, f"to {remote}"))


@click.command("download")
@click.argument("remote")
@click.argument("local")
@click.option("--workers", default=8, show_default=True, help="Files downloaded in parallel.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def download_command(remote: str, local: str, workers: int, quiet: bool) -> None:
    """Copy a remote dataset into a local folder, verifying every shard; index.json last.

    Example: streamshards download gs://bucket/datasets/web-v1 ./web-v1
    """
    try:
        report = download(remote, local, workers, progress=not quiet)
    except _ERRORS as err:
        raise click.ClickException(str(err)) from None
    click.echo(_summary("downloaded", report, f"into {local}"))
