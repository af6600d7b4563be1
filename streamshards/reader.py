"""Opening local shards: size and hash checks before first use, then decompression."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from streamshards.format import ShardError, ShardView, decompress, stored_hash
from streamshards.index import Index, NotRegularFileError, ShardInfo, open_regular
from streamshards.verify import is_verified, mark_verified, mismatch


def open_shard(path: Path, info: ShardInfo, index: Index) -> ShardView:
    """Verify a local shard file against its index entry and return a view of its samples.

    Only a regular file of exactly the indexed size is read (never a FIFO, device or
    directory). Uncompressed shards are memory-mapped (zero-copy); zstd shards are
    decompressed into memory, never beyond the raw size the index promises.
    """
    try:
        fd, size = open_regular(path)
    except FileNotFoundError:
        raise ShardError(f"shard {info.file}: file {path} is missing") from None
    except NotRegularFileError as err:
        raise ShardError(f"shard {info.file}: {err}") from None
    except OSError as err:
        raise ShardError(f"shard {info.file}: cannot open {path}: {err.strerror}") from None
    try:
        if size != info.stored_bytes:
            raise ShardError(
                f"shard {info.file}: file is {size} bytes, index field stored_bytes says "
                f"{info.stored_bytes} (truncated or replaced?)"
            )
        data = b"" if size == 0 else mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        if not is_verified(fd, info):  # a stamped file was hashed by an earlier reader
            checked = os.fstat(fd)
            actual = stored_hash(data)
            if actual != info.hash:
                raise ShardError(f"shard {info.file}: {mismatch(info, str(path), size, actual)}")
            mark_verified(fd, info, checked)
    finally:
        os.close(fd)
    raw = data if info.compression is None else decompress(data, info.raw_bytes, info.file)
    if info.compression is None and len(raw) != info.raw_bytes:
        raise ShardError(
            f"shard {info.file}: {len(raw)} raw bytes, index field raw_bytes says {info.raw_bytes}"
        )
    return ShardView(raw, list(index.columns), index.column_types, info.samples, info.file)
