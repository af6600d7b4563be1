"""MosaicML Streaming's MDS format (index.json version 2), read in place.

Shard layout: u32 sample count, ``count + 1`` u32 absolute offsets, then per sample the u32
sizes of its variable-size columns followed by every column's bytes in ``column_names`` order.
See docs/INTEROP.md for the encodings and what each becomes.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from streamshards.columns import parse_column_type
from streamshards.format import ShardError
from streamshards.index import Index, IndexFormatError, ShardInfo
from streamshards.interop.common import (
    HASHES,
    Codec,
    RowView,
    check_hash,
    check_total,
    decode_array,
    decode_row,
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

_SCALARS = {
    "int": "<i8",
    "int8": "i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint8": "u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
}
_VALUE_DTYPES = {
    8: "u1",
    9: "i1",
    16: "<u2",
    17: "<i2",
    18: "<f2",
    32: "<u4",
    33: "<i4",
    34: "<f4",
    64: "<u8",
    65: "<i8",
    66: "<f8",
}
_SHAPE_DTYPES = {0: "u1", 1: "<u2", 2: "<u4", 3: "<u8"}
_UNSUPPORTED = {
    "pil": "PIL images",
    "jpeg": "JPEG images",
    "png": "PNG images",
    "str_decimal": "decimal.Decimal",
}
_CODECS = ("zstd", "gz", "bz2")
#: Option that lets a ``pkl`` column through as the raw pickle bytes (never unpickled).
PKL_OPTION = "pkl_as_bytes"
TOKENS = "tokens"


def is_mds(obj: Any) -> bool:
    """Whether a decoded index.json is MosaicML Streaming's MDS index."""
    return isinstance(obj, dict) and obj.get("version") == 2 and isinstance(obj.get("shards"), list)


def _scalar(dtype: str) -> Codec:
    dt = np.dtype(dtype)
    native = "float64" if dt.kind == "f" else "int64"
    return Codec(native, partial(decode_scalar, dt), dt.itemsize, (dt, ()))


def _ndarray_codec(spec: str, column: str, where: str) -> Codec:
    args = spec.split(":")[1:]
    if len(args) > 2:
        raise IndexFormatError(f"{where}: column {column!r}: bad encoding {spec!r}")
    dtype = None
    if args and args[0]:
        names = {np.dtype(v).name: v for v in _VALUE_DTYPES.values()}
        if args[0] not in names:
            raise IndexFormatError(f"{where}: column {column!r}: unknown dtype in {spec!r}")
        dtype = np.dtype(names[args[0]])
    shape = None
    if len(args) == 2:
        try:
            shape = tuple(int(d) for d in args[1].split(","))
        except ValueError:
            raise IndexFormatError(f"{where}: column {column!r}: bad shape in {spec!r}") from None
    if dtype is not None and shape is not None:
        native = f"ndarray:{dtype.name}:{'x'.join(map(str, shape))}"
        size = math.prod(shape) * dtype.itemsize
        return Codec(native, partial(decode_array, dtype, shape), size, (dtype, shape))
    # A dtype stored per sample has no single native dtype: listed as float64 (docs/INTEROP.md).
    return Codec(f"ndarray:{(dtype or np.dtype('<f8')).name}", partial(_ndarray, dtype, shape))


def _ndarray(dtype: np.dtype | None, shape: tuple[int, ...] | None, b: memoryview) -> np.ndarray:
    """An MDS ndarray whose dtype (one byte) and/or shape (ndim and shape dtype in one byte,
    then the dimensions) precede the values."""
    pos = 0
    if dtype is None:
        dtype = np.dtype(_VALUE_DTYPES[b[0]])
        pos = 1
    if shape is None:
        byte = b[pos]
        ndim, shape_dtype = byte >> 2, np.dtype(_SHAPE_DTYPES[byte & 3])
        shape = tuple(np.frombuffer(b, shape_dtype, count=ndim, offset=pos + 1).tolist())
        pos += 1 + ndim * shape_dtype.itemsize
    count = math.prod(shape)
    if pos + count * dtype.itemsize != len(b):
        raise ValueError(f"ndarray of shape {shape} does not fill its {len(b)} bytes")
    return np.frombuffer(b, dtype, count=count, offset=pos).reshape(shape)


def _json(b: memoryview) -> Any:
    return json.loads(str(b, "utf-8"))


def _str_int(b: memoryview) -> int:
    return int(str(b, "utf-8"))


def _str_float(b: memoryview) -> float:
    return float(str(b, "utf-8"))


def _int64_rows(b: memoryview) -> np.ndarray:
    if len(b) % 8:
        raise ValueError(f"legacy token bytes of length {len(b)} are not whole int64 values")
    return np.frombuffer(b, "<i8")


def column_codec(spec: Any, column: str, where: str, options: dict, legacy_tokens: bool) -> Codec:
    """The codec of one MDS column encoding, refusing pickle and image encodings by name."""
    if not isinstance(spec, str):
        raise IndexFormatError(f"{where}: column {column!r}: encoding {spec!r} is not a string")
    if spec in _SCALARS:
        return _scalar(_SCALARS[spec])
    if spec == "str":
        return Codec("str", decode_str)
    if spec == "bytes":
        if legacy_tokens:
            return Codec("ndarray:int64", _int64_rows)
        return Codec("bytes", bytes)
    if spec == "json":
        return Codec("json", _json)
    if spec == "str_int":
        return Codec("int64", _str_int)
    if spec == "str_float":
        return Codec("float64", _str_float)
    if spec == "ndarray" or spec.startswith("ndarray:"):
        return _ndarray_codec(spec, column, where)
    if spec == "pkl":
        if options.get(PKL_OPTION):
            return Codec("bytes", bytes)
        raise IndexFormatError(
            f"{where}: column {column!r} is pickled (MDS encoding 'pkl'); unpickling runs "
            f"arbitrary code, so streamshards never does it. Pass {PKL_OPTION}=True (in a "
            "Stream's options, or --pkl-as-bytes) to read the column as the raw pickle bytes"
        )
    what = _UNSUPPORTED.get(spec.split(":")[0])
    if what:
        raise IndexFormatError(
            f"{where}: column {column!r} has MDS encoding {spec!r} ({what}), which streamshards "
            "does not decode"
        )
    raise IndexFormatError(f"{where}: column {column!r} has unknown MDS encoding {spec!r}")


class MDSFormat:
    """The parsed MDS index: column codecs and each shard's files and hashes."""

    kind = "mds"

    def __init__(self, obj: dict, source: str, options: dict):
        unknown = set(options) - {PKL_OPTION}
        if unknown:
            raise ValueError(f"{source}: unknown option(s) for an MDS dataset: {sorted(unknown)}")
        shards = obj["shards"]
        if not shards:
            raise IndexFormatError(f"{source}: MDS index lists no shards")
        first = f"{source}: shards[0]"
        if not isinstance(shards[0], dict):
            raise IndexFormatError(f"{first}: not an object")
        names = field(shards[0], "column_names", list, first)
        encodings = field(shards[0], "column_encodings", list, first)
        sizes = field(shards[0], "column_sizes", list, first)
        if not names or len({len(names), len(encodings), len(sizes)}) != 1:
            raise IndexFormatError(
                f"{first}: column_names, column_encodings and column_sizes differ in length"
            )
        legacy = names == ["tokens"] and encodings == ["bytes"]
        self.names = [str(n) for n in names]
        self.codecs = [
            column_codec(spec, name, first, options, legacy) for name, spec in zip(names, encodings)
        ]
        for name, codec, size in zip(names, self.codecs, sizes):
            if size != codec.size:
                raise IndexFormatError(
                    f"{first}: column {name!r}: column_sizes says {size}, its encoding {codec.size}"
                )
        self.headed = [k for k, c in enumerate(self.codecs) if c.size is None]
        columns = {name: codec.native for name, codec in zip(self.names, self.codecs)}
        self.native_arrays = [parse_column_type(t, n).array for n, t in columns.items()]
        self.hashes: list[dict] = []
        self.raw_hashes: list[dict] = []
        infos = []
        seen: set[str] = set()
        for k, entry in enumerate(shards):
            where = f"{source}: shards[{k}]"
            if not isinstance(entry, dict):
                raise IndexFormatError(f"{where}: not an object")
            if entry.get("format") != "mds":
                raise IndexFormatError(f"{where}: format is {entry.get('format')!r}, not 'mds'")
            for key, value in (("column_names", names), ("column_encodings", encodings)):
                if entry.get(key) != value:
                    raise IndexFormatError(f"{where}: {key} differ from shards[0]'s")
            samples = field(entry, "samples", int, where)
            raw = field(entry, "raw_data", dict, where)
            raw_size = field(raw, "bytes", int, f"{where}.raw_data")
            raw_name = safe_relpath(field(raw, "basename", str, f"{where}.raw_data"), where)
            raw_hashes = field(raw, "hashes", dict, f"{where}.raw_data", optional=True) or {}
            codec = entry.get("compression")
            zipped = entry.get("zip_data")
            if codec is None:
                file, stored, hashes, compression = raw_name, raw_size, raw_hashes, None
            else:
                compression = str(codec).split(":")[0]
                if compression not in _CODECS:
                    raise IndexFormatError(
                        f"{where}: compression {codec!r} is not supported (supported: "
                        f"{', '.join(_CODECS)}); decompress the dataset with MosaicML Streaming"
                    )
                if not isinstance(zipped, dict):
                    raise IndexFormatError(f"{where}: compressed shard without zip_data")
                file = safe_relpath(field(zipped, "basename", str, f"{where}.zip_data"), where)
                stored = field(zipped, "bytes", int, f"{where}.zip_data")
                hashes = field(zipped, "hashes", dict, f"{where}.zip_data", optional=True) or {}
            if file in seen or file == "index.json":
                raise IndexFormatError(f"{where}: shard file {file!r} is listed twice or clashes")
            seen.add(file)
            self.hashes.append(hashes)
            self.raw_hashes.append(raw_hashes)
            infos.append(
                ShardInfo(
                    file,
                    samples,
                    raw_size,
                    stored,
                    fingerprint_hash(hashes or raw_hashes, stored),
                    compression,
                )
            )
        provenance = {
            "format": "mds",
            "library": "mosaicml-streaming",
            "index_version": 2,
            "encodings": dict(zip(self.names, encodings)),
            "hashes": sorted({a for h in self.hashes + self.raw_hashes for a in h if a in HASHES}),
        }
        self.index = Index(columns, check_total(infos, source), provenance)

    def complete(self, source: Any) -> Index:
        """The index once the first shard (``source.path(0)``) has been seen: an LLM Foundry
        ``tokens`` column of 1-D integer rows is listed as rows of the first row's length (a
        row of another length is an error on read)."""
        k = self.names.index(TOKENS) if TOKENS in self.names else -1
        codec = self.codecs[k] if k >= 0 else None
        if codec is None or codec.size is not None or not codec.native.startswith("ndarray:"):
            return self.index
        dtype = np.dtype(codec.native.split(":")[1])
        if dtype.kind not in "iu" or not self.index.shards[0].samples:
            return self.index
        try:
            self._list_row_length(k, dtype, source.path(0))
        finally:
            source.release(0)
        return self.index

    def _list_row_length(self, k: int, dtype: np.dtype, first: Path) -> None:
        codec = self.codecs[k]
        view = self.open_view(first, 0)
        row = view.value(k, 0)
        if row.ndim != 1 or row.dtype != dtype:
            return
        length = len(row)
        skip = int(view.sizes[0, k]) - length * dtype.itemsize

        native = f"ndarray:{dtype.name}:{length}"
        decode = partial(decode_row, codec.decode, length)
        self.codecs[k] = Codec(native, decode, None, (dtype, (length,)), skip)
        columns = dict(self.index.columns)
        columns[TOKENS] = native
        self.native_arrays[k] = (dtype, (length,))
        self.index = Index(columns, self.index.shards, self.index.provenance)

    def verify_stored(self, data: Any, shard: int) -> None:
        """Check a stored shard file's recorded hash (the compressed file's, if compressed)."""
        check_hash(data, self.hashes[shard], self.index.shards[shard].file)

    def open_view(self, path: Path, shard: int) -> RowView:
        """Verify shard ``shard`` at ``path`` and return a view of its samples."""
        info = self.index.shards[shard]
        data = map_file(path, info.file, info.stored_bytes)
        self.verify_stored(data, shard)
        if info.compression is None:
            raw = data
        else:
            raw = decompress(data, info.compression, info.raw_bytes, info.file)
            if not self.hashes[shard]:
                check_hash(raw, self.raw_hashes[shard], info.file)
        if len(raw) != info.raw_bytes:
            raise ShardError(
                f"shard {info.file}: {len(raw)} raw bytes, index says {info.raw_bytes}"
            )
        offsets = read_offsets(raw, info.samples, info.file)
        if offsets[-1] != len(raw):
            raise ShardError(
                f"shard {info.file}: sample offsets end at byte {int(offsets[-1])}, the shard "
                f"has {len(raw)}"
            )
        starts, sizes = item_table(raw, offsets, self.codecs, self.headed, info.file)
        return RowView(raw, starts, sizes, self.names, self.codecs, self.native_arrays, info.file)
