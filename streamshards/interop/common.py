"""What the MDS and LitData readers share: safe paths, hash checks, bounded decompression and
a view over rows of per-column byte ranges with the interface of a native ``ShardView``."""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import re
import stat
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xxhash
import zstandard

from streamshards.format import ShardError
from streamshards.index import MAX_SAMPLES, IndexFormatError, ShardInfo

# Shard files up to this size are read into memory in one call: for them a memory map (its
# page faults and unmapping) costs more than the copy. Larger ones are mapped, never copied.
SMALL_FILE = 1 << 20

_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

# Checked in this order: the first one an index records is the one verified (fastest first).
HASHES: dict[str, Callable[[Any], str]] = {
    "xxh3_64": xxhash.xxh3_64_hexdigest,
    "xxh64": xxhash.xxh64_hexdigest,
    "md5": lambda data: hashlib.md5(data).hexdigest(),
    "sha1": lambda data: hashlib.sha1(data).hexdigest(),
}


def safe_relpath(name: Any, where: str) -> str:
    """Accept a relative path inside the dataset folder (``0/shard.00000.mds``), refusing
    ``..``, absolute paths, backslashes and URLs."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or not all(_PART.match(p) and p not in (".", "..") for p in parts):
        raise IndexFormatError(
            f"{where}: shard file {name!r} is not a relative path inside the dataset folder "
            "('..', absolute paths, backslashes and URLs are refused)"
        )
    return name


def field(obj: dict, key: str, kind: type | tuple, where: str, optional: bool = False) -> Any:
    """``obj[key]`` checked for type (and non-negative when an int); errors name the field."""
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise IndexFormatError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise IndexFormatError(f"{where}: field {key!r} has type {type(value).__name__}")
    if isinstance(value, int) and value < 0:
        raise IndexFormatError(f"{where}: field {key!r} is negative ({value})")
    if isinstance(value, int) and value > MAX_SAMPLES:
        raise IndexFormatError(f"{where}: field {key!r} is {value}, more than 2**63 - 1")
    return value


def check_total(infos: list[ShardInfo], source: str) -> list[ShardInfo]:
    """Refuse an index whose shards hold more samples than sample ids can count."""
    if sum(info.samples for info in infos) > MAX_SAMPLES:
        raise IndexFormatError(f"{source}: the shards hold more than 2**63 - 1 samples in all")
    return infos


def fingerprint_hash(hashes: dict, size: int) -> str:
    """The string the dataset fingerprints a foreign shard by: its first known hash, else size."""
    for algo in HASHES:
        if isinstance(hashes.get(algo), str):
            return f"{algo}:{hashes[algo]}"
    return f"size:{size}"


def map_file(path: Path, name: str, size: int | None) -> bytes | mmap.mmap:
    """Memory-map a shard file read-only after checking that it is a regular file of the size
    the index says (opened non-blocking: a FIFO in a shard's place never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ShardError(f"shard {name}: file {path} is missing") from None
    except OSError as err:
        raise ShardError(f"shard {name}: cannot open {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ShardError(f"shard {name}: {path} is not a regular file")
        if size is not None and st.st_size != size:
            raise ShardError(
                f"shard {name}: file is {st.st_size} bytes, index says {size} (truncated?)"
            )
        if st.st_size > SMALL_FILE:
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        return read_all(fd, st.st_size, name)
    finally:
        os.close(fd)


def read_all(fd: int, size: int, name: str) -> bytes:
    """The ``size`` bytes of an open file, in as few reads as the kernel allows."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise ShardError(f"shard {name}: file ended {left} bytes early (truncated while read?)")
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_hash(data: Any, hashes: dict, name: str) -> None:
    """Verify the fastest hash the foreign index records for these bytes (none: nothing to do)."""
    for algo, digest in HASHES.items():
        expected = hashes.get(algo)
        if isinstance(expected, str):
            actual = digest(data)
            if actual != expected.lower():
                raise ShardError(
                    f"shard {name}: hash mismatch: index says {algo}={expected}, file has {actual}"
                )
            return


def decompress(data: Any, codec: str, raw_bytes: int | None, name: str) -> bytes:
    """Decompress a whole foreign shard, never past the raw size its index promises."""
    limit = raw_bytes if raw_bytes is not None else 1 << 40
    try:
        if codec == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(memoryview(data))
            raw = reader.read(limit + 1)
        elif codec == "gz":
            import zlib

            raw = zlib.decompressobj(wbits=31).decompress(bytes(data), limit + 1)
        elif codec == "bz2":
            import bz2

            raw = bz2.BZ2Decompressor().decompress(bytes(data), max_length=limit + 1)
        else:
            raise ShardError(f"shard {name}: compression {codec!r} is not supported")
    except (zstandard.ZstdError, OSError, EOFError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"shard {name}: {codec} decompression failed: {err}") from None
    if raw_bytes is not None and len(raw) != raw_bytes:
        raise ShardError(
            f"shard {name}: decompressed to {len(raw)}{'+' if len(raw) > limit else ''} bytes, "
            f"index says {raw_bytes}"
        )
    return raw


# Decoders are module-level functions (or partials of them), so codecs pickle into workers.
def decode_str(b: memoryview) -> str:
    """UTF-8 text."""
    return str(b, "utf-8")


def decode_scalar(dtype: np.dtype, b: memoryview) -> int | float:
    """One little-endian number, as a Python int or float."""
    value = np.frombuffer(b, dtype)[0]
    return float(value) if dtype.kind == "f" else int(value)


def decode_array(dtype: np.dtype, shape: tuple[int, ...] | None, b: memoryview) -> np.ndarray:
    """Raw values of ``dtype`` (a read-only view), reshaped when ``shape`` is given."""
    array = np.frombuffer(b, dtype)
    return array if shape is None else array.reshape(shape)


def decode_row(decode: Callable[[memoryview], Any], length: int, b: memoryview) -> np.ndarray:
    """A 1-D row of exactly ``length`` values, decoded by ``decode``."""
    value = decode(b)
    if value.shape != (length,):
        raise ValueError(f"a row of shape {value.shape}, where the first row has {length}")
    return value


@dataclass(frozen=True)
class Codec:
    """How one foreign column's bytes become a value.

    ``raw``: (dtype, shape) when each value holds those raw values after ``skip`` header
    bytes, read as one array; ``size``: bytes per stored value when the format fixes it;
    ``native``: the column type the index lists.
    """

    native: str
    decode: Callable[[memoryview], Any]
    size: int | None = None
    raw: tuple[np.dtype, tuple[int, ...]] | None = None
    skip: int = 0


def item_table(
    buf: Any, offsets: np.ndarray, codecs: list[Codec], headed: list[int], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(starts, sizes), each (rows, columns), of rows whose bytes begin with a u32 size per
    column in ``headed`` and then hold the columns back to back; checked against ``offsets``.
    Run once per shard opened, so it keeps to a few whole-array steps."""
    rows = len(offsets) - 1
    if not rows:
        empty = np.zeros((0, len(codecs)), np.int64)
        return empty, empty
    begin = offsets[:-1]
    lengths = offsets[1:] - begin
    head = 4 * len(headed)
    if lengths.min() < head:
        j = int(np.argmax(lengths < head))
        raise ShardError(f"shard {name}: sample {j} is {lengths[j]} bytes, shorter than its header")
    fixed = [c.size or 0 for c in codecs]
    stored = None
    total = np.int64(head + sum(fixed) - sum(fixed[k] for k in headed))
    if headed:
        at = begin[:, None] + np.arange(head)
        stored = np.frombuffer(buf, dtype=np.uint8)[at].view("<u4").astype(np.int64)
        total = (stored[:, 0] if len(headed) == 1 else stored.sum(axis=1)) + total
    wrong = total != lengths
    if wrong.any():
        j = int(np.argmax(wrong))
        given = int(total if stored is None else total[j])
        raise ShardError(
            f"shard {name}: sample {j}'s column sizes add up to {given} bytes, its offsets give "
            f"{int(lengths[j])}"
        )
    for i, k in enumerate(headed):
        size = codecs[k].size
        if size is not None and np.any(stored[:, i] != size):
            raise ShardError(f"shard {name}: column {k} has a size other than {size}")
    if len(codecs) == 1:  # one column, as in LLM Foundry token datasets: no sums across
        sizes = stored if stored is not None else np.full((rows, 1), fixed[0], np.int64)
        return (begin + head)[:, None], sizes
    sizes = np.empty((rows, len(codecs)), dtype=np.int64)
    sizes[:] = fixed
    if stored is not None:
        sizes[:, headed] = stored
    starts = np.cumsum(sizes, axis=1)
    starts -= sizes
    starts += (begin + head)[:, None]
    return starts, sizes


def read_offsets(buf: Any, count: int, name: str) -> np.ndarray:
    """The ``count + 1`` u32 offsets that follow a chunk's or shard's u32 sample count."""
    size = len(buf)
    if size < 4 * (count + 2):
        raise ShardError(f"shard {name}: {size} bytes cannot hold a header of {count} samples")
    header = np.frombuffer(buf, dtype="<u4", count=count + 2).astype(np.int64)
    if header[0] != count:
        raise ShardError(f"shard {name}: header says {int(header[0])} samples, index says {count}")
    offsets = header[1:]
    if offsets[0] < 4 * (count + 2) or (count and (offsets[1:] < offsets[:-1]).any()):
        raise ShardError(f"shard {name}: sample offsets are not increasing from the header's end")
    if offsets[-1] > size:
        raise ShardError(
            f"shard {name}: sample offsets reach byte {int(offsets[-1])}, past the file's "
            f"{size} bytes"
        )
    return offsets


class RowView:
    """Random access to rows stored as per-column byte ranges, with the interface the dataset
    uses on a native ``ShardView`` (``sample``, ``values``, ``fixed_array``)."""

    def __init__(
        self,
        buf: Any,
        starts: np.ndarray,
        sizes: np.ndarray,
        names: list[str],
        codecs: list[Codec],
        native_arrays: list[tuple[np.dtype, tuple[int, ...]] | None],
        name: str,
    ):
        self.buf = buf
        self.mv = memoryview(buf)
        self.starts = starts
        self.sizes = sizes
        self.names = names
        self.codecs = codecs
        self.native_arrays = native_arrays
        self.name = name
        self.num_samples = len(starts)
        self._arrays: dict[int, np.ndarray] = {}
        self._bounds: list[tuple[np.ndarray, np.ndarray]] | None = None

    def values(self, col: int, rows: np.ndarray) -> list:
        """Decode column ``col`` of several samples."""
        if self._bounds is None:
            ends = self.starts + self.sizes
            self._bounds = [
                (self.starts[:, k].copy(), ends[:, k].copy()) for k in range(len(self.codecs))
            ]
        starts, ends = self._bounds[col]
        mv = self.mv
        pairs = zip(starts[rows].tolist(), ends[rows].tolist())
        try:
            if self.codecs[col].native == "str":
                return [str(mv[a:b], "utf-8") for a, b in pairs]
            decode = self.codecs[col].decode
            return [decode(mv[a:b]) for a, b in pairs]
        except (ValueError, KeyError, UnicodeDecodeError) as err:
            raise ShardError(f"shard {self.name}: column {self.names[col]!r}: {err}") from None

    def value(self, col: int, j: int) -> Any:
        """Decode column ``col`` of sample ``j``."""
        return self.values(col, np.array([j]))[0]

    def sample(self, j: int) -> dict:
        """Decode every column of sample ``j``."""
        if not 0 <= j < self.num_samples:
            raise IndexError(
                f"shard {self.name}: sample {j} out of range 0..{self.num_samples - 1}"
            )
        return {name: self.value(k, j) for k, name in enumerate(self.names)}

    def fixed_array(self, col: int) -> np.ndarray:
        """A fixed-size column as one (num_samples, *shape) array: a strided view of the file
        when rows are evenly spaced and the dtype is already the listed one, else a copy."""
        array = self._arrays.get(col)
        if array is not None:
            return array
        dtype, shape = self.native_arrays[col]
        raw = self.codecs[col].raw
        if raw is None:
            values = self.values(col, np.arange(self.num_samples))
            array = np.array(values, dtype=dtype).reshape((self.num_samples, *shape))
        else:
            array = self._raw_array(col, *raw)
            if raw[0] != dtype:
                too_big = raw[0].kind == "u" and dtype.kind == "i" and len(array)
                if too_big and array.max() > np.iinfo(dtype).max:
                    raise ShardError(
                        f"shard {self.name}: column {self.names[col]!r} holds a {raw[0]} "
                        f"above the range of {dtype}"
                    )
                array = array.astype(dtype)
        self._arrays[col] = array
        return array

    def _raw_array(self, col: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The stored values of a fixed-size column: a strided view when rows are evenly
        spaced (always so when every column is fixed-size), else gathered into a copy."""
        n = self.num_samples
        codec = self.codecs[col]
        width = dtype.itemsize * math.prod(shape)
        if codec.size is None:  # rows the format lets vary in size: each must be one row
            wrong = self.sizes[:, col] != codec.skip + width
            if wrong.any():
                j = int(np.argmax(wrong))
                raise ShardError(
                    f"shard {self.name}: column {self.names[col]!r} of sample {j} is not one "
                    f"{dtype} array of shape {shape}, as its first sample is"
                )
        starts = self.starts[:, col]  # where each value begins, its skip header bytes included
        step = int(starts[1] - starts[0]) if n > 1 else width
        # One column of one size: rows back to back (as offsets give them) are evenly spaced.
        even = n < 3 or len(self.codecs) == 1 or (starts[2:] - starts[1:-1] == step).all()
        if n and step >= width and even:
            inner = [dtype.itemsize * math.prod(shape[k + 1 :]) for k in range(len(shape))]
            first = int(starts[0]) + codec.skip
            return np.ndarray((n, *shape), dtype, self.buf, first, (step, *inner))
        if codec.skip:
            starts = starts + codec.skip
        at = starts[:, None] + np.arange(width)[None, :]
        data = np.frombuffer(self.buf, dtype=np.uint8)[at] if n else np.zeros((0, width), np.uint8)
        return data.view(dtype).reshape((n, *shape))


def check_file(f: BinaryIO, info: ShardInfo, where: str) -> None:
    """Raise ShardError unless the open file ``f`` is the foreign shard ``info``: its size, and
    the hash its index records (``ShardInfo.hash`` is ``ALGO:HEX``, or ``size:N`` without one).
    A stored size of 0 is unknown (a LitData ``.zstd.bin`` chunk): checked when decompressed."""
    f.flush()
    size = os.fstat(f.fileno()).st_size
    algo, _, expected = info.hash.partition(":")
    if info.stored_bytes and size != info.stored_bytes:
        raise ShardError(
            f"shard {info.file}: {where} is {size} bytes, the index says {info.stored_bytes}"
        )
    if algo not in HASHES:
        return
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else nullcontext(b"") as data:
        actual = HASHES[algo](data)
    if actual != expected.lower():
        raise ShardError(
            f"shard {info.file}: {where} does not match the index: index says {algo}={expected}, "
            f"file has {actual}"
        )
