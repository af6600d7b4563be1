"""Column types: parsing type strings, encoding sample values to bytes, decoding them back.

A column is fixed-size (int64, float64, ndarray with a fixed shape: samples sit at
``i * itemsize`` with no offsets table) or variable-size (str, bytes, json, ndarray
without a shape: an offsets table locates each sample). See docs/FORMAT.md.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

DTYPES = (
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
)
SCALAR_KINDS = ("str", "bytes", "int64", "float64", "json")


@dataclass(frozen=True)
class ColumnType:
    """A parsed column type such as ``str`` or ``ndarray:uint16:2048``."""

    kind: str
    dtype: np.dtype | None = None
    shape: tuple[int, ...] | None = None

    @property
    def fixed_size(self) -> int | None:
        """Bytes per sample when every sample has the same size, else None."""
        if self.kind in ("int64", "float64"):
            return 8
        if self.kind == "ndarray" and self.shape is not None:
            return math.prod(self.shape) * self.dtype.itemsize
        return None

    @property
    def array(self) -> tuple[np.dtype, tuple[int, ...]] | None:
        """(dtype, per-sample shape) for columns read as one numpy array, else None."""
        if self.kind in ("int64", "float64"):
            return np.dtype("<i8" if self.kind == "int64" else "<f8"), ()
        if self.kind == "ndarray" and self.shape is not None:
            return self.dtype, self.shape
        return None

    def __str__(self) -> str:
        if self.kind != "ndarray":
            return self.kind
        text = f"ndarray:{self.dtype.name}"
        if self.shape is not None:
            text += ":" + "x".join(str(d) for d in self.shape)
        return text


def parse_column_type(spec: str, column: str = "?") -> ColumnType:
    """Parse a type string; raise ValueError naming the column on anything unknown."""
    if not isinstance(spec, str):
        raise ValueError(f"column {column!r}: type must be a string, got {spec!r}")
    if spec in SCALAR_KINDS:
        return ColumnType(spec)
    parts = spec.split(":")
    if parts[0] != "ndarray" or len(parts) not in (2, 3):
        raise ValueError(
            f"column {column!r}: unknown type {spec!r}; expected one of {', '.join(SCALAR_KINDS)},"
            " ndarray:DTYPE or ndarray:DTYPE:SHAPE (e.g. ndarray:uint16:2048, ndarray:float32:3x32)"
        )
    if parts[1] not in DTYPES:
        raise ValueError(
            f"column {column!r}: unknown dtype {parts[1]!r} in {spec!r}; known: {DTYPES}"
        )
    dtype = np.dtype(parts[1]).newbyteorder("<")
    shape = None
    if len(parts) == 3:
        try:
            shape = tuple(int(d) for d in parts[2].split("x"))
        except ValueError:
            raise ValueError(f"column {column!r}: bad shape {parts[2]!r} in {spec!r}") from None
        if not shape or any(d < 0 for d in shape):
            raise ValueError(f"column {column!r}: bad shape {parts[2]!r} in {spec!r}")
    return ColumnType("ndarray", dtype, shape)


def _as_array(value: Any, ctype: ColumnType, column: str) -> np.ndarray:
    """Convert a value to a little-endian array of the column's dtype, refusing lossy casts."""
    arr = np.asarray(value)
    target = ctype.dtype
    if arr.dtype != target and arr.size:
        if arr.dtype.kind in "iub" and target.kind in "iub":
            bounds = np.iinfo(target) if target.kind != "b" else None
            low, high = (bounds.min, bounds.max) if bounds else (0, 1)
            if arr.min() < low:
                raise ValueError(f"column {column!r}: value below the range of {target.name}")
            if arr.max() > high:
                raise ValueError(f"column {column!r}: value above the range of {target.name}")
        elif not (arr.dtype.kind in "iubf" and target.kind == "f"):
            raise ValueError(f"column {column!r}: array of dtype {arr.dtype} does not fit {ctype}")
    if arr.dtype != target:
        arr = arr.astype(target)
    if ctype.shape is not None and arr.shape != ctype.shape:
        raise ValueError(f"column {column!r}: shape {arr.shape} does not match {ctype}")
    return arr


def encode(value: Any, ctype: ColumnType, column: str) -> bytes:
    """Encode one sample's value of a column; ValueError names the column on a misfit."""
    kind = ctype.kind
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"column {column!r}: expected str, got {type(value).__name__}")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"column {column!r}: string is not valid UTF-8 ({err})") from None
    if kind == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"column {column!r}: expected bytes, got {type(value).__name__}")
        return bytes(value)
    if kind == "int64":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"column {column!r}: expected int, got {type(value).__name__}")
        try:
            return struct.pack("<q", int(value))
        except struct.error:
            raise ValueError(f"column {column!r}: {value} does not fit int64") from None
    if kind == "float64":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"column {column!r}: expected float, got {type(value).__name__}")
        return struct.pack("<d", float(value))
    if kind == "json":
        try:
            return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as err:
            raise ValueError(f"column {column!r}: value is not JSON-serialisable ({err})") from None
    arr = _as_array(value, ctype, column)
    if ctype.shape is not None:
        return arr.tobytes()
    header = struct.pack(f"<Q{arr.ndim}Q", arr.ndim, *arr.shape)
    data = arr.tobytes()
    return header + data + b"\0" * (-len(data) % 8)


def decode(buf: memoryview, ctype: ColumnType) -> Any:
    """Decode one sample's bytes; ndarray columns come back as read-only numpy views."""
    kind = ctype.kind
    if kind == "str":
        return str(buf, "utf-8")
    if kind == "bytes":
        return bytes(buf)
    if kind == "int64":
        return struct.unpack("<q", buf)[0]
    if kind == "float64":
        return struct.unpack("<d", buf)[0]
    if kind == "json":
        return json.loads(str(buf, "utf-8"))
    if ctype.shape is not None:
        return np.frombuffer(buf, dtype=ctype.dtype).reshape(ctype.shape)
    if len(buf) < 8:
        raise ValueError(f"corrupt ndarray: {len(buf)} bytes is shorter than its header")
    (ndim,) = struct.unpack_from("<Q", buf, 0)
    if ndim > 32 or 8 + 8 * ndim > len(buf):
        raise ValueError(f"corrupt ndarray header (ndim={ndim})")
    shape = struct.unpack_from(f"<{ndim}Q", buf, 8)
    count = math.prod(shape)
    start = 8 + 8 * ndim
    if start + count * ctype.dtype.itemsize > len(buf):
        raise ValueError(f"corrupt ndarray: shape {shape} overruns its {len(buf)} bytes")
    return np.frombuffer(buf, dtype=ctype.dtype, count=count, offset=start).reshape(shape)
