"""LitData's chunk format (``{"chunks": [...], "config": {...}}``), read in place.

PyTreeLoader chunks: u32 item count, ``count + 1`` u32 offsets, then per item a u32 size per
leaf and the leaves. Variants: whole-file zstd (``.zstd.bin``), framed zstd (``LDFZ01``) and,
for dicts of plain leaves, an Arrow IPC footer (``LDARW01``). TokensLoader chunks hold the
token arrays back to back and are served as blocks of ``block_size`` tokens per chunk.
See docs/INTEROP.md.
"""

from __future__ import annotations

import json
import struct
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from streamshards.columns import parse_column_type
from streamshards.format import ShardError
from streamshards.index import Index, IndexFormatError, ShardInfo
from streamshards.interop.common import (
    Codec,
    RowView,
    check_total,
    decode_array,
    decode_scalar,
    decode_str,
    decompress,
    field,
    fingerprint_hash,
    item_table,
    map_file,
    read_offsets,
    safe_relpath,
)

# litdata's dtype numbering (numpy's int, uint, float type lists in order).
_DTYPES = ["i1", "<i2", "<i4", "<i8", "u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8"]
_FRAMED = b"LDFZ01\0\0"
_ARROW = b"LDARW01\0"
_ZSTD = b"\x28\xb5\x2f\xfd"
BLOCK_OPTION = "block_size"


def is_litdata(obj: Any) -> bool:
    """Whether a decoded index.json is LitData's chunk index."""
    return isinstance(obj, dict) and isinstance(obj.get("chunks"), list) and "config" in obj


def _dtype(index: str, column: str, where: str) -> np.dtype:
    try:
        return np.dtype(_DTYPES[int(index)])
    except (ValueError, IndexError):
        raise IndexFormatError(
            f"{where}: column {column!r}: litdata dtype number {index!r} is not supported "
            f"(0..{len(_DTYPES) - 1}: int8..int64, uint8..uint64, float16..float64)"
        ) from None


def _numpy_with_header(b: memoryview) -> np.ndarray:
    dtype_index, ndim = struct.unpack_from("<II", b, 0)
    dims = struct.unpack_from(f"<{ndim}I", b, 8)
    dtype = np.dtype(_DTYPES[dtype_index])
    start = 8 + 4 * ndim
    count = int(np.prod(dims))
    if start + count * dtype.itemsize != len(b):
        raise ValueError(f"array of shape {dims} does not fill its {len(b)} bytes")
    return np.frombuffer(b, dtype, count=count, offset=start).reshape(dims)


def leaf_codec(fmt: Any, column: str, where: str) -> Codec:
    """The codec of one litdata leaf ``data_format``."""
    if fmt == "str":
        return Codec("str", decode_str)
    if fmt == "bytes":
        return Codec("bytes", bytes)
    if fmt == "int":
        dt = np.dtype("<i8")
        return Codec("int64", partial(decode_scalar, dt), 8, (dt, ()))
    if fmt == "float":
        dt = np.dtype("<f8")
        return Codec("float64", partial(decode_scalar, dt), 8, (dt, ()))
    if isinstance(fmt, str) and fmt.startswith("no_header_numpy:"):
        dt = _dtype(fmt.split(":")[1], column, where)
        return Codec(f"ndarray:{dt.name}", partial(decode_array, dt, None))
    if fmt == "numpy":
        # The dtype is stored per item: listed as float64 (docs/INTEROP.md).
        return Codec("ndarray:float64", _numpy_with_header)
    raise IndexFormatError(
        f"{where}: column {column!r} has litdata data_format {fmt!r}, which streamshards does "
        "not decode (supported: str, int, float, bytes, numpy, no_header_numpy:N)"
    )


def leaf_names(spec_text: Any, leaves: int, where: str) -> list[str]:
    """Column names from litdata's ``data_spec``: a dict of plain leaves, or one bare leaf."""
    try:
        _, spec = json.loads(spec_text)
        kind = spec["type"]
        if kind is None:
            names = ["tokens"] if leaves == 1 else []
        elif kind == "builtins.dict" and all(c["type"] is None for c in spec["children_spec"]):
            names = [str(n) for n in json.loads(spec["context"])]
        else:
            raise IndexFormatError(
                f"{where}: samples of type {kind} with nested containers are not supported; "
                "streamshards reads dicts of plain leaves or one bare leaf"
            )
    except (TypeError, ValueError, KeyError) as err:
        if isinstance(err, IndexFormatError):
            raise
        raise IndexFormatError(f"{where}: config.data_spec is not a litdata pytree spec") from None
    if len(names) != leaves or len(set(names)) != leaves:
        raise IndexFormatError(
            f"{where}: config.data_spec names {names} but data_format has {leaves} leaves"
        )
    return names


class LitDataFormat:
    """The parsed LitData index: leaves as columns, chunks as shards."""

    kind = "litdata"

    def __init__(self, obj: dict, source: str, options: dict):
        unknown = set(options) - {BLOCK_OPTION}
        if unknown:
            raise ValueError(
                f"{source}: unknown option(s) for a LitData dataset: {sorted(unknown)}"
            )
        where = f"{source}: config"
        config = field(obj, "config", dict, source)
        if config.get("encryption"):
            raise IndexFormatError(
                f"{where}: the chunks are encrypted ({config['encryption']!r}); streamshards "
                "does not decrypt them: decrypt the dataset with litdata first"
            )
        self.loader = config.get("item_loader")
        if self.loader not in ("PyTreeLoader", "TokensLoader"):
            raise IndexFormatError(
                f"{where}: item_loader {self.loader!r} is not supported "
                "(PyTreeLoader and TokensLoader are)"
            )
        compression = config.get("compression")
        self.compression = str(compression).split(":")[0] if compression else None
        if self.compression not in (None, "zstd"):
            raise IndexFormatError(f"{where}: compression {compression!r} is not supported")
        if self.compression and config.get("compression_level") not in (None, "chunk", "batch"):
            raise IndexFormatError(
                f"{where}: compression_level {config.get('compression_level')!r} is not supported"
                " (whole-chunk 'chunk' and framed 'batch' are)"
            )
        formats = field(config, "data_format", list, where)
        if not formats:
            raise IndexFormatError(f"{where}: data_format is empty")
        self.names = leaf_names(config.get("data_spec"), len(formats), where)
        self.block_size = options.get(BLOCK_OPTION)
        if self.loader == "TokensLoader":
            fmt = formats[0]
            if len(formats) != 1 or not str(fmt).startswith("no_header_numpy:"):
                raise IndexFormatError(f"{where}: TokensLoader data_format {formats} is not tokens")
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(
                    f"{source}: a LitData TokensLoader dataset needs block_size= (tokens per "
                    "sample; litdata's TokensLoader(block_size=...)): index.json does not record it"
                )
            self.dtype = _dtype(str(fmt).split(":")[1], "tokens", where)
            self.names = ["tokens"]
            self.codecs = []
            columns = {"tokens": f"ndarray:{self.dtype.name}:{self.block_size}"}
        else:
            if self.block_size is not None:
                raise ValueError(
                    f"{source}: block_size= applies to LitData TokensLoader datasets only; "
                    f"this one uses {self.loader}"
                )
            self.codecs = [leaf_codec(f, n, where) for f, n in zip(formats, self.names)]
            columns = {n: c.native for n, c in zip(self.names, self.codecs)}
        self.native_arrays = [parse_column_type(t, n).array for n, t in columns.items()]
        self.leftover: list[int] = []
        infos = []
        seen: set[str] = set()
        for k, chunk in enumerate(field(obj, "chunks", list, source)):
            at = f"{source}: chunks[{k}]"
            if not isinstance(chunk, dict):
                raise IndexFormatError(f"{at}: not an object")
            name = safe_relpath(field(chunk, "filename", str, at), at)
            if name in seen or name == "index.json":
                raise IndexFormatError(f"{at}: chunk file {name!r} is listed twice or clashes")
            seen.add(name)
            items = field(chunk, "chunk_size", int, at)
            size = field(chunk, "chunk_bytes", int, at)
            samples = items
            if self.loader == "TokensLoader":
                dim = field(chunk, "dim", int, at)
                samples = dim // self.block_size
                self.leftover.append(dim - samples * self.block_size)
            whole_zstd = self.compression == "zstd" and config.get("compression_level") != "batch"
            # chunk_bytes is the file's size, except for whole-file zstd where it is the raw size.
            stored = 0 if whole_zstd else size
            compression = self.compression
            infos.append(
                ShardInfo(name, samples, size, stored, fingerprint_hash({}, size), compression)
            )
        self.items = [c["chunk_size"] for c in obj["chunks"]]
        self.dims = [c.get("dim") for c in obj["chunks"]]
        provenance = {
            "format": "litdata",
            "library": "litdata",
            "item_loader": self.loader,
            "data_format": formats,
            "compression": self.compression,
            "compression_level": config.get("compression_level"),
        }
        if self.loader == "TokensLoader":
            provenance["block_size"] = self.block_size
            provenance["leftover_tokens_never_served"] = sum(self.leftover)
        self.index = Index(columns, check_total(infos, source), provenance)

    def complete(self, source: Any) -> Index:
        """The index: nothing in a LitData dataset needs a look at its chunks first."""
        return self.index

    def open_view(self, path: Path, shard: int) -> RowView | TokensView | ArrowView:
        """Read chunk ``shard`` at ``path`` (decompressing it whole if needed) and view it."""
        info = self.index.shards[shard]
        data = map_file(path, info.file, info.stored_bytes or None)
        if data[:8] == _FRAMED:
            raw, offsets = _unframe(data, self.items[shard], info.file)
        else:
            raw = data
            if data[:4] == _ZSTD:
                raw = decompress(data, "zstd", info.raw_bytes, info.file)
            elif info.compression == "zstd":
                raise ShardError(f"shard {info.file}: chunk is neither framed nor zstd")
            offsets = read_offsets(raw, self.items[shard], info.file)
            if offsets[-1] != len(raw) and raw[-8:] != _ARROW:
                raise ShardError(
                    f"shard {info.file}: item offsets end at byte {int(offsets[-1])}, the chunk "
                    f"has {len(raw)}"
                )
        if self.loader == "TokensLoader":
            return TokensView(raw, offsets, self.dtype, self.block_size, self.dims[shard], info)
        if raw[-8:] == _ARROW and len(set(offsets.tolist())) == 1:
            return ArrowView(raw, self.names, self.codecs, self.native_arrays, info)
        headed = list(range(len(self.codecs)))
        starts, sizes = item_table(raw, offsets, self.codecs, headed, info.file)
        return RowView(raw, starts, sizes, self.names, self.codecs, self.native_arrays, info.file)


def _unframe(data: Any, items: int, name: str) -> tuple[bytes, np.ndarray]:
    """Decompress a framed-zstd chunk: magic, u16 version, u16 flags, u32 items, u32 items per
    frame, u32 frames, ``items + 1`` u32 offsets into the concatenated item bytes, then per
    frame (u32 first item, u32 items, u64 file offset, u32 stored and u32 raw size)."""
    head = struct.Struct("<8sHHIII")
    if len(data) < head.size:
        raise ShardError(f"shard {name}: framed chunk shorter than its header")
    _, version, _, count, _, frames = head.unpack_from(data, 0)
    if version != 1:
        raise ShardError(f"shard {name}: framed chunk version {version} is not supported (1 is)")
    if count != items:
        raise ShardError(f"shard {name}: header says {count} items, index says {items}")
    table = head.size + 4 * (count + 1)
    if table + 24 * frames > len(data):
        raise ShardError(f"shard {name}: frame table runs past the file's {len(data)} bytes")
    offsets = np.frombuffer(data, "<u4", count=count + 1, offset=head.size).astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise ShardError(f"shard {name}: item offsets are not increasing from 0")
    parts = []
    done = 0
    for k in range(frames):
        first, rows, pos, stored, raw = struct.unpack_from("<IIQII", data, table + 24 * k)
        if first != done or first + rows > count:
            raise ShardError(f"shard {name}: frame {k} holds items {first}.., expected {done}..")
        if offsets[first + rows] - offsets[first] != raw or pos + stored > len(data):
            raise ShardError(f"shard {name}: frame {k}'s sizes disagree with the item offsets")
        parts.append(decompress(memoryview(data)[pos : pos + stored], "zstd", raw, name))
        done += rows
    if done != count:
        raise ShardError(f"shard {name}: frames hold {done} items, the header says {count}")
    return b"".join(parts), offsets


class TokensView:
    """The blocks of one TokensLoader chunk: ``dim // block_size`` rows, zero-copy."""

    def __init__(
        self,
        buf: Any,
        offsets: np.ndarray,
        dtype: np.dtype,
        block_size: int,
        dim: int,
        info: ShardInfo,
    ):
        self.name = info.file
        self.names = ["tokens"]
        start = int(offsets[0])
        if start + dim * dtype.itemsize > len(buf):
            raise ShardError(
                f"shard {info.file}: {dim} tokens of {dtype} run past the chunk's {len(buf)} bytes"
            )
        self.num_samples = info.samples
        self.buf = buf
        self.blocks = np.frombuffer(
            buf, dtype, count=self.num_samples * block_size, offset=start
        ).reshape(self.num_samples, block_size)

    def fixed_array(self, col: int) -> np.ndarray:
        """Every block of the chunk as one (blocks, block_size) view."""
        return self.blocks

    def values(self, col: int, rows: np.ndarray) -> list:
        """Blocks by row number (the column is fixed-size; kept for the common interface)."""
        return list(self.blocks[rows])

    def sample(self, j: int) -> dict:
        """Block ``j`` of the chunk."""
        if not 0 <= j < self.num_samples:
            raise IndexError(
                f"shard {self.name}: sample {j} out of range 0..{self.num_samples - 1}"
            )
        return {"tokens": self.blocks[j]}


class ArrowView:
    """Items of a chunk whose rows live in an Arrow IPC footer (litdata's plain-leaf dicts)."""

    def __init__(
        self, buf: Any, names: list[str], codecs: list[Codec], arrays: list, info: ShardInfo
    ):
        try:
            import pyarrow as pa
        except ImportError:
            raise ShardError(
                f"shard {info.file}: rows are stored as Arrow IPC; install pyarrow "
                "(pip install 'streamshards[parquet]')"
            ) from None
        self.name = info.file
        self.names = names
        self.native_arrays = arrays
        (length,) = struct.unpack_from("<I", buf, len(buf) - 12)
        start = len(buf) - 12 - length
        if start < 0:
            raise ShardError(
                f"shard {info.file}: Arrow footer of {length} bytes overruns the chunk"
            )
        try:
            table = pa.ipc.open_file(pa.py_buffer(bytes(buf[start : len(buf) - 12]))).read_all()
        except (pa.ArrowInvalid, OSError) as err:
            raise ShardError(f"shard {info.file}: Arrow footer does not decode: {err}") from None
        missing = [n for n in names if n not in table.column_names]
        if missing or table.num_rows != info.samples:
            raise ShardError(
                f"shard {info.file}: Arrow footer has {table.num_rows} rows and columns "
                f"{table.column_names}, index says {info.samples} rows of {names}"
            )
        self.num_samples = table.num_rows
        self.table = table
        self._lists: dict[int, list] = {}
        self._arrays: dict[int, np.ndarray] = {}

    def _list(self, col: int) -> list:
        values = self._lists.get(col)
        if values is None:
            values = self.table.column(self.names[col]).to_pylist()
            self._lists[col] = values
        return values

    def values(self, col: int, rows: np.ndarray) -> list:
        """Column ``col`` of several rows."""
        values = self._list(col)
        return [values[r] for r in rows.tolist()]

    def fixed_array(self, col: int) -> np.ndarray:
        """A scalar column as one array."""
        array = self._arrays.get(col)
        if array is None:
            dtype, _ = self.native_arrays[col]
            array = np.asarray(self._list(col), dtype=dtype)
            self._arrays[col] = array
        return array

    def sample(self, j: int) -> dict:
        """Every column of row ``j``."""
        if not 0 <= j < self.num_samples:
            raise IndexError(
                f"shard {self.name}: sample {j} out of range 0..{self.num_samples - 1}"
            )
        return {name: self._list(k)[j] for k, name in enumerate(self.names)}
