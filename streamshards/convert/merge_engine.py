"""``streamshards merge --engine ray``: merge on an engine, byte-identical to ``merge.merge``.

One task per part shard reports its samples' sizes; the driver cuts the output shards where
one ShardWriter would (``plan.plan_raw_shards``); one task per output shard copies its
samples from the part shards it overlaps and writes the shard. The parts and OUT must be
folders every node reaches (a shared file system). The index is written last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamshards._version import __version__
from streamshards.columns import parse_column_type
from streamshards.convert.engine import Engine, Task
from streamshards.convert.engines import open_engine
from streamshards.convert.plan import ShardPlan, plan_raw_shards, sample_bytes
from streamshards.format import shard_chunks, write_shard
from streamshards.index import INDEX_NAME, Index, ShardInfo, creation_time, load_index, write_index
from streamshards.merge import find_parts
from streamshards.reader import open_shard
from streamshards.util import fsync_folder, parse_size
from streamshards.writer import parse_compression, prepare_output


@dataclass(frozen=True)
class Source:
    """One shard of one part: the part folder (absolute) and the shard's index entry."""

    folder: str
    info: ShardInfo


def sample_sizes_task(source: Source) -> np.ndarray:
    """Each sample's size as ShardWriter counts it (encoded bytes plus 8 a column)."""
    index = load_index(source.folder)
    view = open_shard(Path(source.folder) / source.info.file, source.info, index)
    sizes = np.zeros(view.num_samples, dtype=np.int64)
    for column in view.columns:
        if column.offsets is None:
            sizes += column.ctype.fixed_size
        else:
            sizes += np.diff(column.offsets.astype(np.int64))
    return sample_bytes(sizes, len(view.columns))


def merge_shard_task(
    name: str, plan: ShardPlan, sources: list[Source], columns: dict, level: int | None, out: str
) -> dict:
    """Copy one planned output shard's samples from the part shards (``sources``, one for each
    of ``plan.pieces``) and write it into OUT."""
    values: list[list[bytes]] = [[] for _ in columns]
    indexes: dict[str, Index] = {}
    for piece, source in zip(plan.pieces, sources):
        index = indexes.get(source.folder) or indexes.setdefault(
            source.folder, load_index(source.folder)
        )
        view = open_shard(Path(source.folder) / source.info.file, source.info, index)
        for j in range(piece.start, piece.stop):
            for column, value in zip(values, view.encoded(j)):
                column.append(value)
    types = [parse_column_type(t, c) for c, t in columns.items()]
    chunks = [b"".join(shard_chunks(list(zip(types, values)), plan.samples))]
    tmp = Path(out) / f".{name}.{os.getpid()}.tmp"
    try:
        raw_bytes, stored_bytes, digest = write_shard(tmp, chunks, level)
        os.replace(tmp, Path(out) / name)
        fsync_folder(Path(out))
    finally:
        tmp.unlink(missing_ok=True)
    compression = "zstd" if level is not None else None
    return ShardInfo(name, plan.samples, raw_bytes, stored_bytes, digest, compression).to_dict()


def merge_on_engine(
    parts: list[str],
    out: str,
    compression: str | None = "zstd",
    size_limit: int | str = "64MB",
    overwrite: bool = False,
    engine: Engine | str = "ray",
) -> Index:
    """As ``merge.merge`` (same bytes), with the reading and writing done by engine tasks."""
    folders = [f.resolve() for f in find_parts(parts)]
    indexes = [load_index(folder) for folder in folders]
    columns = indexes[0].columns
    for folder, index in zip(folders, indexes):
        if list(index.columns.items()) != list(columns.items()):
            raise ValueError(f"{folder}: columns {index.columns} differ from {columns}")
    level = parse_compression(compression)
    limit = parse_size(size_limit)
    target = Path(out).resolve()
    prepare_output(target)
    if (target / INDEX_NAME).exists():
        if not overwrite:
            raise FileExistsError(
                f"{target / INDEX_NAME} exists; pass overwrite=True to replace it"
            )
        (target / INDEX_NAME).unlink()
    sources = [Source(str(f), info) for f, index in zip(folders, indexes) for info in index.shards]
    runner = open_engine(engine, None) if isinstance(engine, str) else engine
    try:
        tasks = [Task(f"sizes-{k:06d}", sample_sizes_task, (s,)) for k, s in enumerate(sources)]
        sizes = dict(runner.run(tasks))
        plans = plan_raw_shards([sizes[t.name] for t in tasks], limit)
        suffix = ".ssd.zst" if level is not None else ".ssd"
        tasks = [
            Task(
                f"merge-{p.number:06d}",
                merge_shard_task,
                (
                    f"shard.{p.number:06d}{suffix}",
                    p,
                    [sources[piece.unit] for piece in p.pieces],
                    columns,
                    level,
                    str(target),
                ),
            )
            for p in plans
        ]
        written = dict(runner.run(tasks))
    finally:
        if runner is not engine:
            runner.close()
    shards = [ShardInfo.from_dict(written[task.name]) for task in tasks]
    provenance = {"tool": f"streamshards {__version__}", "created": creation_time()}
    provenance["parts"] = [index.provenance for index in indexes]
    index = Index(columns, shards, provenance)
    write_index(target, index)
    return load_index(target)
