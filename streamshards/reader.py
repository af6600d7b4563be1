"""Opening local shards: size and hash checks before first use, then decompression."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from streamshards.format import ShardError, ShardView, decompress, stored_hash
from streamshards.index import Index, ShardInfo


def open_shard(path: Path, info: ShardInfo, index: Index) -> ShardView:
    """Verify a local shard file against its index entry and return a view of its samples.

    Uncompressed shards are memory-mapped (zero-copy); zstd shards are decompressed into
    memory, never beyond the raw size the index promises.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ShardError(f"shard {info.file}: file {path} is missing") from None
    if size != info.stored_bytes:
        raise ShardError(
            f"shard {info.file}: file is {size} bytes, index says {info.stored_bytes} "
            f"(truncated?); hash: index says xxh3_64={info.hash}, "
            f"file has {stored_hash(Path(path).read_bytes())}"
        )
    if size == 0:
        data: bytes | mmap.mmap = b""
    else:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    actual = stored_hash(data)
    if actual != info.hash:
        raise ShardError(
            f"shard {info.file}: hash mismatch: index says xxh3_64={info.hash}, file has {actual}"
        )
    raw = data if info.compression is None else decompress(data, info.raw_bytes, info.file)
    if info.compression is None and len(raw) != info.raw_bytes:
        raise ShardError(f"shard {info.file}: {len(raw)} raw bytes, index says {info.raw_bytes}")
    return ShardView(raw, list(index.columns), index.column_types, info.samples, info.file)
