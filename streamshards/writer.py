"""ShardWriter: turns sample dicts into compressed, hashed shards and an index (F1, F4, F5)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from streamshards._version import __version__
from streamshards.columns import encode, parse_column_type
from streamshards.format import shard_chunks, write_shard
from streamshards.index import (
    INDEX_NAME,
    Index,
    ShardInfo,
    creation_time,
    write_index,
)
from streamshards.util import fsync_folder, parse_size


class OutputError(OSError):
    """The output folder cannot be written (a file, read-only, full disk); one line, naming it."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code


def output_error(out: str | os.PathLike, err: OSError) -> OutputError:
    """A one-line error for a failure writing into ``out``, saying what the user can do."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        message = (
            f"{out}: no space left on the device{where}; free some space and run the same "
            "command again"
        )
    elif err.errno == errno.EROFS:
        message = f"{out} is on a read-only file system{where}"
    elif err.errno in (errno.EACCES, errno.EPERM):
        message = f"{out}: permission denied{where}"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST):
        message = f"{out}: a path on the way is a file, not a folder{where}"
    else:
        message = f"{out}: cannot write{where}: {err.strerror or err}"
    return OutputError(err.errno, message)


def prepare_output(out: Path) -> None:
    """Create the output folder if needed; OutputError if it is a file or not writable."""
    if out.exists() and not out.is_dir():
        raise OutputError(errno.ENOTDIR, f"{out} is a file, not a folder; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(out, err) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"{out}: the folder is not writable")


def parse_compression(compression: str | None) -> int | None:
    """``zstd`` (level 3), ``zstd:LEVEL`` or None; returns the zstd level or None."""
    if compression in (None, "none", "None", ""):
        return None
    if compression == "zstd":
        return 3
    match = re.fullmatch(r"zstd:(-?\d+)", str(compression))
    if not match or not -7 <= int(match.group(1)) <= 22:
        raise ValueError(f"unknown compression {compression!r}; use zstd, zstd:1..22 or None")
    return int(match.group(1))


class ShardWriter:
    """Write samples into shards under ``out``; the index is written last, on close.

    Each shard is written under a temporary name and renamed when complete, and the index
    is replaced atomically, so a crash leaves the old dataset or none, never a partial one.

    >>> with ShardWriter("out/", {"text": "str", "tokens": "ndarray:uint16:2048"}) as w:
    ...     w.write({"text": "hello", "tokens": tokens})
    """

    def __init__(
        self,
        out: str | os.PathLike,
        columns: Mapping[str, str],
        compression: str | None = "zstd",
        size_limit: int | str = "64MB",
        provenance: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        shard_prefix: str = "shard",
    ):
        if not columns:
            raise ValueError("ShardWriter needs at least one column")
        self.out = Path(out)
        self.columns = dict(columns)
        self.types = [parse_column_type(t, name) for name, t in self.columns.items()]
        self.level = parse_compression(compression)
        self.size_limit = parse_size(size_limit)
        if not self.size_limit or self.size_limit <= 0:
            raise ValueError(f"size_limit must be positive, got {size_limit!r}")
        self.provenance = dict(provenance or {})
        self.shard_prefix = shard_prefix
        prepare_output(self.out)
        index_path = self.out / INDEX_NAME
        if index_path.exists():
            if not overwrite:
                raise FileExistsError(f"{index_path} exists; pass overwrite=True to replace it")
            try:
                index_path.unlink()
                fsync_folder(self.out)
            except OSError as err:
                raise output_error(self.out, err) from None
        self.shards: list[ShardInfo] = []
        self._buffers: list[list[bytes]] = [[] for _ in self.types]
        self._count = 0
        self._raw = 0
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[ShardInfo] | None = None

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample; every column must be present and fit its type."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        missing = [name for name in self.columns if name not in sample]
        if missing:
            raise ValueError(
                f"sample is missing column(s) {missing}; columns: {list(self.columns)}"
            )
        extra = [name for name in sample if name not in self.columns]
        if extra:
            raise ValueError(f"sample has unknown column(s) {extra}; columns: {list(self.columns)}")
        encoded = [encode(sample[name], t, name) for name, t in zip(self.columns, self.types)]
        self.write_encoded(encoded)

    def write_encoded(self, encoded: list[bytes]) -> None:
        """Add one sample whose columns are already encoded (used by merge and convert)."""
        size = sum(len(v) for v in encoded) + 8 * len(encoded)
        if self._count and self._raw + size > self.size_limit:
            self._start_shard()
        for buffer, value in zip(self._buffers, encoded):
            buffer.append(value)
        self._count += 1
        self._raw += size

    def flush(self) -> None:
        """Finish the current shard and wait until it is written and renamed into place."""
        self._start_shard()
        self._wait()

    def _start_shard(self) -> None:
        """Hand the filled shard to a background thread (compressing, hashing, writing and
        syncing overlap the next shard's samples); one shard at a time is in flight."""
        if not self._count:
            return
        chunks = shard_chunks(list(zip(self.types, self._buffers)), self._count)
        count = self._count
        self._buffers = [[] for _ in self.types]
        self._count = 0
        self._raw = 0
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamshards-writer")
        suffix = ".ssd.zst" if self.level is not None else ".ssd"
        name = f"{self.shard_prefix}.{len(self.shards):06d}{suffix}"
        self._pending = self._pool.submit(self._write_shard, chunks, name, count)

    def _write_shard(self, chunks: list[bytes], name: str, count: int) -> ShardInfo:
        """Build, compress, hash and write one shard under a temporary name, then rename it."""
        tmp = self.out / f".{name}.tmp"
        try:
            # One joined buffer: a copy, but one write or compress call instead of one a sample.
            raw_bytes, stored_bytes, digest = write_shard(tmp, [b"".join(chunks)], self.level)
            os.replace(tmp, self.out / name)
            fsync_folder(self.out)
        except OSError as err:
            tmp.unlink(missing_ok=True)  # a full disk keeps no partial shard
            raise output_error(self.out, err) from None
        compression = "zstd" if self.level is not None else None
        return ShardInfo(name, count, raw_bytes, stored_bytes, digest, compression)

    def _wait(self) -> None:
        """Wait for the shard in flight and record it; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.shards.append(pending.result())

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def index(self) -> Index:
        """The index describing what has been flushed so far."""
        provenance = {"tool": f"streamshards {__version__}", "created": creation_time()}
        provenance.update(self.provenance)
        return Index(self.columns, list(self.shards), provenance)

    def close(self) -> Index:
        """Flush the last shard and write index.json atomically."""
        if self._closed:
            return self.index()
        try:
            self.flush()
        finally:
            self._shutdown()
        index = self.index()
        try:
            write_index(self.out, index)
        except OSError as err:
            raise output_error(self.out, err) from None
        self._closed = True
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # An exception inside the block leaves no index: the folder is not a dataset.
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            if self._pending is not None:
                self._pending.exception()  # let the shard in flight finish; the block's error wins
            self._shutdown()
