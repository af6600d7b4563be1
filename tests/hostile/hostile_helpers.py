"""A small dataset of several shards for the hostile index and shard tests to damage."""

from __future__ import annotations

from pathlib import Path

from streamshards import ShardWriter

COLUMNS = {"id": "int64", "text": "str"}
SAMPLES = [{"id": k, "text": f"sample {k} " + "ab\u00e9" * (k % 17)} for k in range(60)]


def write(folder: Path, compression: str | None = "zstd") -> Path:
    """A dataset of SAMPLES in several shards."""
    with ShardWriter(folder, COLUMNS, compression=compression, size_limit=1500) as writer:
        for sample in SAMPLES:
            writer.write(sample)
    return folder
