"""Column types: one codec per kind, parsed from type strings, encoding values and decoding them.

A column is fixed-size (int64, float64, ndarray with a fixed shape: samples sit at
``i * itemsize`` with no offsets table) or variable-size (str, bytes, json, ndarray
without a shape: an offsets table locates each sample). See docs/FORMAT.md; adding a kind
is one ``ColumnCodec`` subclass and one line in ``CODECS`` (docs/EXTENDING.md).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

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


@dataclass(frozen=True)
class ColumnCodec:
    """How one column kind is stored: its size, its numpy view, and each sample's bytes.

    ``fixed_size`` is the bytes per sample when every sample has the same size (no offsets
    table), else None. ``array`` is (dtype, per-sample shape) for columns read as one numpy
    array, else None; ``scalar`` says such a column's samples are plain Python numbers.
    """

    kind: ClassVar[str]
    syntax: ClassVar[str] = ""  # how the type is written, for the unknown-type error
    fixed_size: ClassVar[int | None] = None
    array: ClassVar[tuple[np.dtype, tuple[int, ...]] | None] = None
    scalar: ClassVar[bool] = False
    dtype: ClassVar[np.dtype | None] = None
    shape: ClassVar[tuple[int, ...] | None] = None

    @classmethod
    def parse(cls, params: str | None, spec: str, column: str) -> ColumnCodec:
        """The codec for ``spec``, whose text after ``kind:`` is ``params`` (None if absent)."""
        if params is not None:
            raise _unknown(spec, column)
        return cls()

    def encode(self, value: Any, column: str) -> bytes:
        """One sample's stored bytes; ValueError names the column when the value does not fit."""
        raise NotImplementedError

    def decode(self, buf: memoryview) -> Any:
        """One sample's value from its stored bytes; ValueError when they are corrupt."""
        raise NotImplementedError

    def decode_many(self, buf: memoryview, starts: list[int], ends: list[int]) -> list:
        """The values of several samples at ``buf[start:end]`` (a batch of a variable column)."""
        decode = self.decode
        return [decode(buf[a:b]) for a, b in zip(starts, ends)]

    def __str__(self) -> str:
        return self.kind


@dataclass(frozen=True)
class StrCodec(ColumnCodec):
    """UTF-8 text."""

    kind: ClassVar[str] = "str"

    def encode(self, value: Any, column: str) -> bytes:
        if not isinstance(value, str):
            raise ValueError(f"column {column!r}: expected str, got {type(value).__name__}")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"column {column!r}: string is not valid UTF-8 ({err})") from None

    def decode(self, buf: memoryview) -> Any:
        return str(buf, "utf-8")

    def decode_many(self, buf: memoryview, starts: list[int], ends: list[int]) -> list:
        return [str(buf[a:b], "utf-8") for a, b in zip(starts, ends)]  # the text fast path


@dataclass(frozen=True)
class BytesCodec(ColumnCodec):
    """Opaque bytes, stored as given."""

    kind: ClassVar[str] = "bytes"

    def encode(self, value: Any, column: str) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"column {column!r}: expected bytes, got {type(value).__name__}")
        return bytes(value)

    def decode(self, buf: memoryview) -> Any:
        return bytes(buf)


@dataclass(frozen=True)
class Int64Codec(ColumnCodec):
    """A signed 64-bit integer, 8 bytes little-endian."""

    kind: ClassVar[str] = "int64"
    fixed_size: ClassVar[int] = 8
    array: ClassVar[tuple[np.dtype, tuple[int, ...]]] = (np.dtype("<i8"), ())
    scalar: ClassVar[bool] = True

    def encode(self, value: Any, column: str) -> bytes:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"column {column!r}: expected int, got {type(value).__name__}")
        try:
            return struct.pack("<q", int(value))
        except struct.error:
            raise ValueError(f"column {column!r}: {value} does not fit int64") from None

    def decode(self, buf: memoryview) -> Any:
        return struct.unpack("<q", buf)[0]


@dataclass(frozen=True)
class Float64Codec(ColumnCodec):
    """An IEEE 754 double, 8 bytes little-endian."""

    kind: ClassVar[str] = "float64"
    fixed_size: ClassVar[int] = 8
    array: ClassVar[tuple[np.dtype, tuple[int, ...]]] = (np.dtype("<f8"), ())
    scalar: ClassVar[bool] = True

    def encode(self, value: Any, column: str) -> bytes:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"column {column!r}: expected float, got {type(value).__name__}")
        return struct.pack("<d", float(value))

    def decode(self, buf: memoryview) -> Any:
        return struct.unpack("<d", buf)[0]


@dataclass(frozen=True)
class JsonCodec(ColumnCodec):
    """Any strict JSON value (no NaN or Infinity), stored as UTF-8 JSON text."""

    kind: ClassVar[str] = "json"

    def encode(self, value: Any, column: str) -> bytes:
        try:
            return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as err:
            raise ValueError(f"column {column!r}: value is not JSON-serialisable ({err})") from None

    def decode(self, buf: memoryview) -> Any:
        return json.loads(str(buf, "utf-8"))


@dataclass(frozen=True)
class ArrayCodec(ColumnCodec):
    """``ndarray:DTYPE``: an array of any shape, stored with its shape in an 8-byte-word header."""

    kind: ClassVar[str] = "ndarray"
    syntax: ClassVar[str] = (
        "ndarray:DTYPE or ndarray:DTYPE:SHAPE (e.g. ndarray:uint16:2048, ndarray:float32:3x32)"
    )
    dtype: np.dtype

    @classmethod
    def parse(cls, params: str | None, spec: str, column: str) -> ColumnCodec:
        """``DTYPE`` gives this codec, ``DTYPE:SHAPE`` (``3x32``) a ``FixedArrayCodec``."""
        parts = [] if params is None else params.split(":")
        if len(parts) not in (1, 2):
            raise _unknown(spec, column)
        if parts[0] not in DTYPES:
            raise ValueError(
                f"column {column!r}: unknown dtype {parts[0]!r} in {spec!r}; known: {DTYPES}"
            )
        dtype = np.dtype(parts[0]).newbyteorder("<")
        if len(parts) == 1:
            return cls(dtype)
        try:
            shape = tuple(int(d) for d in parts[1].split("x"))
        except ValueError:
            raise ValueError(f"column {column!r}: bad shape {parts[1]!r} in {spec!r}") from None
        if not shape or any(d < 0 for d in shape):
            raise ValueError(f"column {column!r}: bad shape {parts[1]!r} in {spec!r}")
        return FixedArrayCodec(dtype, shape)

    def encode(self, value: Any, column: str) -> bytes:
        arr = self._as_array(value, column)
        header = struct.pack(f"<Q{arr.ndim}Q", arr.ndim, *arr.shape)
        data = arr.tobytes()
        return header + data + b"\0" * (-len(data) % 8)

    def decode(self, buf: memoryview) -> Any:
        """A read-only numpy view of the stored array, its header checked against its bytes."""
        if len(buf) < 8:
            raise ValueError(f"corrupt ndarray: {len(buf)} bytes is shorter than its header")
        (ndim,) = struct.unpack_from("<Q", buf, 0)
        if ndim > 32 or 8 + 8 * ndim > len(buf):
            raise ValueError(f"corrupt ndarray header (ndim={ndim})")
        shape = struct.unpack_from(f"<{ndim}Q", buf, 8)
        count = math.prod(shape)
        start = 8 + 8 * ndim
        if start + count * self.dtype.itemsize > len(buf):
            raise ValueError(f"corrupt ndarray: shape {shape} overruns its {len(buf)} bytes")
        return np.frombuffer(buf, dtype=self.dtype, count=count, offset=start).reshape(shape)

    def _as_array(self, value: Any, column: str) -> np.ndarray:
        """``value`` as a little-endian array of the column's dtype, refusing lossy casts."""
        arr = np.asarray(value)
        target = self.dtype
        if arr.dtype != target and arr.size:
            if arr.dtype.kind in "iub" and target.kind in "iub":
                bounds = np.iinfo(target) if target.kind != "b" else None
                low, high = (bounds.min, bounds.max) if bounds else (0, 1)
                if arr.min() < low:
                    raise ValueError(f"column {column!r}: value below the range of {target.name}")
                if arr.max() > high:
                    raise ValueError(f"column {column!r}: value above the range of {target.name}")
            elif not (arr.dtype.kind in "iubf" and target.kind == "f"):
                raise ValueError(
                    f"column {column!r}: array of dtype {arr.dtype} does not fit {self}"
                )
        if arr.dtype != target:
            arr = arr.astype(target)
        if self.shape is not None and arr.shape != self.shape:
            raise ValueError(f"column {column!r}: shape {arr.shape} does not match {self}")
        return arr

    def __str__(self) -> str:
        return f"ndarray:{self.dtype.name}"


@dataclass(frozen=True)
class FixedArrayCodec(ArrayCodec):
    """``ndarray:DTYPE:SHAPE``: every sample one array of that shape, stored bare."""

    shape: tuple[int, ...]

    @property
    def fixed_size(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def array(self) -> tuple[np.dtype, tuple[int, ...]]:
        return self.dtype, self.shape

    def encode(self, value: Any, column: str) -> bytes:
        return self._as_array(value, column).tobytes()

    def decode(self, buf: memoryview) -> Any:
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape)

    def __str__(self) -> str:
        return f"ndarray:{self.dtype.name}:" + "x".join(str(d) for d in self.shape)


# The registry: the text before the first ":" of a type string names its codec class.
CODECS: dict[str, type[ColumnCodec]] = {
    "str": StrCodec,
    "bytes": BytesCodec,
    "int64": Int64Codec,
    "float64": Float64Codec,
    "json": JsonCodec,
    "ndarray": ArrayCodec,
}

ColumnType = ColumnCodec  # the name the index, readers and dataset annotate column types with


def _unknown(spec: str, column: str) -> ValueError:
    known = ", ".join(codec.syntax or codec.kind for codec in CODECS.values())
    return ValueError(f"column {column!r}: unknown type {spec!r}; expected one of {known}")


def parse_column_type(spec: str, column: str = "?") -> ColumnCodec:
    """The codec of a type string; ValueError naming the column on anything unknown."""
    if not isinstance(spec, str):
        raise ValueError(f"column {column!r}: type must be a string, got {spec!r}")
    kind, colon, params = spec.partition(":")
    codec = CODECS.get(kind)
    if codec is None:
        raise _unknown(spec, column)
    return codec.parse(params if colon else None, spec, column)


def encode(value: Any, ctype: ColumnCodec, column: str) -> bytes:
    """Encode one sample's value of a column; ValueError names the column on a misfit."""
    return ctype.encode(value, column)


def decode(buf: memoryview, ctype: ColumnCodec) -> Any:
    """Decode one sample's bytes; ndarray columns come back as read-only numpy views."""
    return ctype.decode(buf)
