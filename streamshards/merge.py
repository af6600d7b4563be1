"""Merging partial datasets (one per writer) into one dataset (F6)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from streamshards.index import INDEX_NAME, Index, load_index
from streamshards.reader import open_shard
from streamshards.writer import ShardWriter


def find_parts(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Dataset folders named directly, or the sub-folders (sorted by name) of a folder of parts."""
    parts: list[Path] = []
    for path in map(Path, paths):
        if (path / INDEX_NAME).is_file():
            parts.append(path)
            continue
        subs = (
            sorted(p for p in path.iterdir() if (p / INDEX_NAME).is_file()) if path.is_dir() else []
        )
        if not subs:
            raise FileNotFoundError(
                f"{path}: neither a dataset (no {INDEX_NAME}) nor a folder of them"
            )
        parts.extend(subs)
    return parts


def merge(
    parts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    compression: str | None = "zstd",
    size_limit: int | str = "64MB",
    overwrite: bool = False,
) -> Index:
    """Concatenate the samples of ``parts`` in order into one dataset at ``out``.

    Samples are re-cut into shards by the same rule a single writer uses, so the result is
    byte-identical however the same sample sequence was split into parts. Part provenance is
    kept in order under ``provenance["parts"]``.
    """
    folders = find_parts(parts)
    indexes = [load_index(folder) for folder in folders]
    columns = indexes[0].columns
    for folder, index in zip(folders, indexes):
        # Order matters too: encoded samples are copied column by column.
        if list(index.columns.items()) != list(columns.items()):
            raise ValueError(f"{folder}: columns {index.columns} differ from {columns}")
    provenance = {"parts": [index.provenance for index in indexes]}
    with ShardWriter(out, columns, compression, size_limit, provenance, overwrite) as writer:
        for folder, index in zip(folders, indexes):
            for info in index.shards:
                view = open_shard(folder / info.file, info, index)
                for j in range(view.num_samples):
                    writer.write_encoded(view.encoded(j))
    return load_index(out)
