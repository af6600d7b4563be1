"""Converting an MDS or LitData dataset into native shards: same samples, same stored order.

Values are copied as they are stored (no re-tokenization). A ``tokens`` column of integer
rows of one length becomes a fixed-shape column, narrowed to uint16 when every id fits
(checked over the whole dataset), else uint32. Columns whose dtype the foreign format
stores per sample take the one dtype they hold.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from streamshards.columns import ColumnType, encode, parse_column_type
from streamshards.index import INDEX_NAME, Index
from streamshards.interop.detect import index_kind
from streamshards.sources import ShardSource, open_source
from streamshards.util import is_remote, local_path
from streamshards.writer import ShardWriter

TOKENS = "tokens"


@dataclass
class ForeignConvertResult:
    """What a conversion read and wrote, and how fast."""

    index: Index
    samples: int
    bytes_in: int
    bytes_out: int
    seconds: float
    columns: dict[str, str]


def is_foreign(dataset: str | os.PathLike) -> bool:
    """Whether ``dataset`` (a folder or an s3:// or gs:// prefix) holds an MDS or LitData
    index.json; a URL without an index.json (input files, say) is not one."""
    text = local_path(dataset)
    try:
        if is_remote(text):
            if any(c in text for c in "*?["):
                return False
            from streamshards.storage import open_storage

            data = open_storage(text).get_bytes(INDEX_NAME)
        else:
            path = Path(text) / INDEX_NAME
            if not path.is_file():
                return False
            data = path.read_bytes()
        return index_kind(json.loads(data)) != "native"
    except (OSError, ValueError, ImportError, RecursionError):
        return False


def open_dataset(dataset: str, local: str | None = None, **options: Any) -> ShardSource:
    """The source of a folder or URL (a URL is mirrored into ``local`` or the default cache)."""
    if is_remote(dataset):
        return open_source(dataset, local, **options)
    return open_source(None, dataset, **options)


def _scan(source: ShardSource, columns: list[int]) -> dict[int, dict[str, Any]]:
    """Per column: the dtypes, row shapes, and lowest and highest value it holds."""
    seen: dict[int, dict[str, Any]] = {c: {"dtypes": set(), "shapes": set()} for c in columns}
    for shard in range(len(source.index.shards)):
        view = source.open_view(shard)
        rows = np.arange(view.num_samples)
        for col in columns:
            info = seen[col]
            ctype = source.index.column_types[col]
            values = [view.fixed_array(col)] if ctype.array else view.values(col, rows)
            for value in values:
                info["dtypes"].add(value.dtype.name)
                info["shapes"].add(value.shape if not ctype.array else value.shape[1:])
                if value.size and value.dtype.kind in "iu":
                    low, high = int(value.min()), int(value.max())
                    info["min"] = min(info.get("min", low), low)
                    info["max"] = max(info.get("max", high), high)
        source.release(shard)
    return seen


def output_columns(source: ShardSource) -> tuple[dict[str, str], dict[str, str]]:
    """(native columns to write, a note per column whose type changed and why)."""
    index = source.index
    names = list(index.columns)
    per_sample = []
    provenance = index.provenance
    encodings = provenance.get("encodings", {})
    formats = dict(zip(names, provenance.get("data_format", [])))
    for k, name in enumerate(names):
        if encodings.get(name) == "ndarray" or formats.get(name) == "numpy":
            per_sample.append(k)
        elif name == TOKENS and index.column_types[k].kind == "ndarray":
            per_sample.append(k)
    scanned = _scan(source, per_sample) if per_sample and index.num_samples else {}
    columns = dict(index.columns)
    notes = {}
    for k, info in scanned.items():
        name = names[k]
        dtypes = sorted(info["dtypes"])
        if len(dtypes) > 1:
            raise ValueError(
                f"column {name!r} holds arrays of several dtypes ({', '.join(dtypes)}); a "
                "native column has one"
            )
        dtype = np.dtype(dtypes[0])
        shapes = info["shapes"]
        if name == TOKENS and dtype.kind in "iu" and len(shapes) == 1:
            (shape,) = shapes
            if len(shape) == 1 and info.get("min", 0) >= 0:
                narrow = "uint16" if info.get("max", 0) < 2**16 else "uint32"
                if info.get("max", 0) < 2**32:
                    columns[name] = f"ndarray:{narrow}:{shape[0]}"
                    if columns[name] == index.columns[name]:
                        continue
                    notes[name] = (
                        f"{index.columns[name]} rows of {shape[0]} ids in "
                        f"{info.get('min', 0)}..{info.get('max', 0)}: stored as {narrow}"
                    )
                    continue
        columns[name] = f"ndarray:{dtype.name}"
        if columns[name] != index.columns[name]:
            notes[name] = f"dtype stored per sample, all {dtype.name}"
    return columns, notes


def _encoded_columns(view: Any, types: list[ColumnType], names: list[str], source_types) -> list:
    """Every column of one shard as a list of per-sample encoded values."""
    rows = np.arange(view.num_samples)
    out = []
    for col, (ctype, name, old) in enumerate(zip(types, names, source_types)):
        if ctype.array is not None:
            dtype, shape = ctype.array
            if old.array is not None:
                array = view.fixed_array(col)
            else:
                values = view.values(col, rows)
                array = np.stack(values) if values else np.zeros((0, *shape), dtype)
            data = np.ascontiguousarray(array, dtype=dtype).tobytes()
            size = ctype.fixed_size
            out.append([data[i * size : (i + 1) * size] for i in range(view.num_samples)])
        elif ctype.kind == "str":
            out.append([v.encode("utf-8") for v in view.values(col, rows)])
        elif ctype.kind == "bytes":
            out.append([bytes(v) for v in view.values(col, rows)])
        else:
            out.append([encode(v, ctype, name) for v in view.values(col, rows)])
    return out


def convert_foreign(
    dataset: str,
    out: str | os.PathLike,
    compression: str | None = "zstd",
    size_limit: int | str = "64MB",
    overwrite: bool = False,
    local: str | None = None,
    **options: Any,
) -> ForeignConvertResult:
    """Write the MDS or LitData dataset at ``dataset`` (folder or URL) as native shards at
    ``out``, sample for sample in stored order; ``options`` as for reading it."""
    start = time.perf_counter()
    source = open_dataset(dataset, local, **options)
    if source.foreign is None:
        raise ValueError(f"{dataset} is not an MDS or LitData dataset")
    index = source.index
    columns, notes = output_columns(source)
    names = list(columns)
    types = [parse_column_type(t, n) for n, t in columns.items()]
    index_text = _index_bytes(source)
    provenance = {
        "converted_from": {
            "source": str(dataset),
            "format": index.provenance.get("format"),
            "library": index.provenance.get("library"),
            "index_version": index.provenance.get("index_version"),
            "index_xxh3_64": xxhash.xxh3_64_hexdigest(index_text),
            "columns": dict(index.columns),
            "changed_columns": notes,
            **{
                k: index.provenance[k]
                for k in ("block_size", "leftover_tokens_never_served", "encodings")
                if k in index.provenance
            },
        }
    }
    bytes_in = 0
    with ShardWriter(out, columns, compression, size_limit, provenance, overwrite) as writer:
        for shard in range(len(index.shards)):
            view = source.open_view(shard)
            bytes_in += os.path.getsize(source.path(shard))
            encoded = _encoded_columns(view, types, names, index.column_types)
            for sample in zip(*encoded):
                writer.write_encoded(list(sample))
            source.release(shard)
        result = writer.close()
    bytes_out = sum(s.stored_bytes for s in result.shards)
    return ForeignConvertResult(
        result,
        result.num_samples,
        bytes_in,
        bytes_out,
        time.perf_counter() - start,
        columns,
    )


def _index_bytes(source: ShardSource) -> bytes:
    """The foreign index.json as read (local folder, or the node cache's copy of a remote)."""
    folder = getattr(source, "folder", None) or getattr(source, "local", None)
    return (Path(folder) / INDEX_NAME).read_bytes()


def convert_command(dataset: str, out: str, options: dict[str, Any], quiet: bool) -> None:
    """``streamshards convert DATASET OUT`` for an MDS or LitData DATASET: convert, publish a
    URL output, print what was written and how fast."""
    import click

    from streamshards.convert.remote import RemoteOutput
    from streamshards.format import ShardError
    from streamshards.index import IndexFormatError

    foreign = {k: v for k, v in options.items() if k in ("block_size", "pkl_as_bytes") and v}
    try:
        remote = RemoteOutput(out)
        result = convert_foreign(
            dataset,
            remote.local,
            compression=options.get("compression", "zstd"),
            size_limit=options.get("size_limit", "64MB"),
            overwrite=bool(options.get("overwrite")),
            **foreign,
        )
        remote.publish(progress=not quiet)
    except (IndexFormatError, ShardError, ValueError, FileExistsError, OSError) as err:
        raise click.ClickException(str(err)) from None
    if quiet:
        return
    fmt = result.index.provenance["converted_from"]["format"]
    seconds = max(result.seconds, 1e-9)
    click.echo(f"converted {fmt} dataset {dataset} into {out}")
    click.echo(f"  samples      {result.samples:,} in {len(result.index.shards):,} shards")
    click.echo(f"  bytes in     {result.bytes_in:,} ({result.bytes_in / seconds / 1e6:.1f} MB/s)")
    click.echo(f"  bytes out    {result.bytes_out:,}")
    for name, note in result.index.provenance["converted_from"]["changed_columns"].items():
        click.echo(f"  {name:<12} {note}")
