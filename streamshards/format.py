"""The shard byte layout: building a raw shard from encoded columns and reading it back.

Layout (all integers little-endian, see docs/FORMAT.md):

    magic  b"SSHARD01"          8 bytes
    u64    num_samples
    u32    num_columns
    u32    reserved (0)
    per column: u64 offsets_pos, u64 data_pos, u64 data_bytes   (offsets_pos 0 = fixed size)
    blocks, each starting at a multiple of 64: per variable column an offsets table of
    num_samples + 1 u64 (relative to its data block), then each column's data block.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zstandard

from streamshards.columns import ColumnType

MAGIC = b"SSHARD01"
ALIGN = 64
_HEAD = struct.Struct("<8sQII")
_COL = struct.Struct("<QQQ")


class ShardError(ValueError):
    """A shard file is corrupt, truncated or does not match its index entry."""


def stored_hash(data: bytes | memoryview) -> str:
    """The hash recorded in the index for a stored shard file: xxh3-64, hex."""
    return xxhash.xxh3_64_hexdigest(data)


def _pad(pos: int) -> int:
    return -pos % ALIGN


def shard_chunks(columns: list[tuple[ColumnType, list[bytes]]], num_samples: int) -> list[bytes]:
    """One raw (uncompressed) shard laid out as a list of byte strings, in file order.

    The values are not joined, so a shard is written without copying it whole.
    """
    pos = _HEAD.size + _COL.size * len(columns)
    chunks: list[bytes] = []
    table: list[tuple[int, int, int]] = []

    def place(blobs: list[bytes], size: int) -> int:
        nonlocal pos
        pad = _pad(pos)
        chunks.append(b"\0" * pad)
        chunks.extend(blobs)
        start = pos + pad
        pos = start + size
        return start

    for ctype, values in columns:
        offsets_pos = 0
        size = sum(map(len, values))
        if ctype.fixed_size is None:
            offsets = np.zeros(num_samples + 1, dtype="<u8")
            np.cumsum([len(v) for v in values], out=offsets[1:])
            offsets_pos = place([offsets.tobytes()], 8 * (num_samples + 1))
        table.append((offsets_pos, place(values, size), size))
    head = _HEAD.pack(MAGIC, num_samples, len(columns), 0)
    head += b"".join(_COL.pack(*entry) for entry in table)
    return [head, *chunks]


def build_shard(columns: list[tuple[ColumnType, list[bytes]]], num_samples: int) -> bytes:
    """One raw (uncompressed) shard as bytes, for building test shards by hand."""
    return b"".join(shard_chunks(columns, num_samples))


def write_shard(path: Path, chunks: list[bytes], level: int | None) -> tuple[int, int, str]:
    """Write a raw shard's chunks to ``path``, zstd-compressed unless ``level`` is None.

    Compresses and hashes as it writes, with no whole-shard copy; the zstd frame records
    the raw size and a checksum. Returns (raw bytes, stored bytes, stored hash).
    """
    raw_bytes = sum(map(len, chunks))
    digest = xxhash.xxh3_64()
    stored = 0
    compressor = None
    if level is not None:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        compressor = cctx.compressobj(size=raw_bytes)
    with open(path, "wb") as f:
        for chunk in chunks:
            out = chunk if compressor is None else compressor.compress(chunk)
            if out:
                digest.update(out)
                f.write(out)
                stored += len(out)
        if compressor is not None:
            out = compressor.flush()
            digest.update(out)
            f.write(out)
            stored += len(out)
        f.flush()
        os.fsync(f.fileno())
    return raw_bytes, stored, digest.hexdigest()


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK_MAX = 128 * 1024
POPULATE_FROM = 1 << 20  # decompression buffers from this size are mapped in up front


def _frame_bounds(stored: memoryview, name: str) -> int:
    """Walk the block headers of the one zstd frame that must fill ``stored`` exactly.

    Returns the most raw bytes the frame can produce (RFC 8878 section 3.1.1.2), so an
    index promising more is refused before anything is allocated, and refuses a frame that
    is truncated or followed by anything (a second frame included).
    """
    if bytes(stored[:4]) != ZSTD_MAGIC:
        raise ShardError(
            f"shard {name}: index field compression is 'zstd' but the file is not a zstd frame "
            f"(it starts with {bytes(stored[:8])!r})"
        )
    try:
        pos = zstandard.frame_header_size(stored)
    except zstandard.ZstdError as err:
        raise ShardError(f"shard {name}: bad zstd frame header: {err}") from None
    most = 0
    last = False
    while not last:
        if pos + 3 > len(stored):
            raise ShardError(f"shard {name}: zstd frame is truncated at byte {pos}")
        header = int.from_bytes(stored[pos : pos + 3], "little")
        last, kind, size = header & 1, header >> 1 & 3, header >> 3
        if kind == 3:
            raise ShardError(f"shard {name}: zstd block at byte {pos} has the reserved type")
        most += _BLOCK_MAX if kind == 2 else size
        pos += 3 + (1 if kind == 1 else size)
    if stored[4] & 4:
        pos += 4
    if pos != len(stored):
        raise ShardError(
            f"shard {name}: the zstd frame ends at byte {pos} but the file has {len(stored)} "
            "bytes (truncated, or followed by data: a shard is exactly one frame)"
        )
    return most


def decompress(stored: bytes | memoryview, raw_bytes: int, name: str) -> memoryview:
    """Decompress a stored shard, refusing to produce more than the index's raw size (F4).

    Decompression streams into one buffer of ``raw_bytes``, allocated only once the frame's
    block headers show it can fill it, and the frame's checksum is checked at its end.
    """
    stored = memoryview(stored)
    most = _frame_bounds(stored, name)
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as err:  # e.g. a reserved bit set in the frame header
        raise ShardError(f"shard {name}: bad zstd frame header: {err}") from None
    if declared not in (-1, raw_bytes):
        raise ShardError(
            f"shard {name}: frame declares {declared} raw bytes, index field raw_bytes says "
            f"{raw_bytes}"
        )
    if most < raw_bytes:
        raise ShardError(
            f"shard {name}: the zstd frame holds at most {most} raw bytes, index field "
            f"raw_bytes says {raw_bytes}"
        )
    out = memoryview(_new_buffer(raw_bytes))
    filled = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=False)
        while filled < raw_bytes:
            got = reader.readinto(out[filled:])
            if not got:
                break
            filled += got
        extra = reader.read(1)
    except zstandard.ZstdError as err:
        raise ShardError(f"shard {name}: zstd decompression failed: {err}") from None
    if extra:
        raise ShardError(
            f"shard {name}: decompresses to more than the {raw_bytes} bytes that index field "
            "raw_bytes promises"
        )
    if filled != raw_bytes:
        raise ShardError(
            f"shard {name}: decompressed to {filled} bytes, index field raw_bytes says {raw_bytes}"
        )
    return out


def _new_buffer(size: int) -> np.ndarray:
    """``size`` bytes of memory to decompress into, its pages mapped in up front.

    A large buffer is an anonymous map populated in one call (``MAP_POPULATE``) rather than
    faulted in as decompression first writes it, so its cost is steady: on a virtual machine
    whose host takes freed memory back, first-touching huge pages measured 0.40-0.46 s per
    200 MB against 0.07 s populated (docs/FORMAT.md, "Reading").
    """
    if size < POPULATE_FROM or not hasattr(mmap, "MAP_POPULATE"):
        return np.empty(size, dtype=np.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), dtype=np.uint8)


@dataclass
class _Column:
    ctype: ColumnType
    offsets: np.ndarray | None
    data_pos: int
    data_bytes: int


class ShardView:
    """Random access to the samples of one raw shard held in memory or a memory map."""

    def __init__(
        self,
        raw: bytes | memoryview,
        names: list[str],
        types: list[ColumnType],
        num_samples: int,
        name: str,
    ):
        self.buf = memoryview(raw)
        self.name = name
        self.num_samples = num_samples
        self.names = names
        if len(self.buf) < _HEAD.size + _COL.size * len(types):
            raise ShardError(
                f"shard {name}: {len(self.buf)} bytes is shorter than the header and column table"
            )
        magic, count, ncols, _ = _HEAD.unpack_from(self.buf, 0)
        if magic != MAGIC:
            raise ShardError(f"shard {name}: bad magic {magic!r}, expected {MAGIC!r}")
        if count != num_samples or ncols != len(types):
            raise ShardError(
                f"shard {name}: header says {count} samples x {ncols} columns, "
                f"index says {num_samples} x {len(types)}"
            )
        self.columns: list[_Column] = []
        self._arrays: dict[int, np.ndarray] = {}
        for k, ctype in enumerate(types):
            self.columns.append(self._column(k, ctype, names[k], count))

    def _column(self, k: int, ctype: ColumnType, column: str, count: int) -> _Column:
        """Check column ``k``'s table entry and offsets against the shard's bounds.

        Every position and length is a u64 compared as an unbounded integer (or unsigned in
        numpy), so no edited value can wrap around into the shard.
        """
        size = len(self.buf)
        offsets_pos, data_pos, data_bytes = _COL.unpack_from(self.buf, _HEAD.size + k * _COL.size)
        if data_pos + data_bytes > size:
            raise ShardError(
                f"shard {self.name}: column {column!r} data ({data_bytes} bytes at {data_pos}) "
                f"overruns the {size}-byte shard"
            )
        if ctype.fixed_size is not None:
            if ctype.fixed_size * count != data_bytes:
                raise ShardError(
                    f"shard {self.name}: column {column!r} holds {data_bytes} bytes, "
                    f"expected {count} x {ctype.fixed_size}"
                )
            return _Column(ctype, None, data_pos, data_bytes)
        if offsets_pos == 0 or offsets_pos + 8 * (count + 1) > size:
            raise ShardError(
                f"shard {self.name}: column {column!r} offsets table is missing or overruns "
                "the shard"
            )
        offsets = np.frombuffer(self.buf, dtype="<u8", count=count + 1, offset=offsets_pos)
        if offsets[0] != 0 or offsets[-1] != data_bytes or np.any(offsets[1:] < offsets[:-1]):
            raise ShardError(
                f"shard {self.name}: column {column!r} offsets are corrupt (they must rise "
                f"from 0 to its {data_bytes} data bytes)"
            )
        return _Column(ctype, offsets, data_pos, data_bytes)

    def _bad_value(self, col: int, where: str, err: Exception) -> ShardError:
        return ShardError(
            f"shard {self.name}: column {self.names[col]!r} {where} does not decode: {err}"
        )

    def value(self, col: int, j: int) -> Any:
        """Decode column ``col`` of sample ``j`` (0-based within this shard)."""
        c = self.columns[col]
        if c.offsets is None:
            size = c.ctype.fixed_size
            start = c.data_pos + j * size
            return c.ctype.decode(self.buf[start : start + size])
        start, end = c.offsets[j : j + 2].tolist()
        try:
            return c.ctype.decode(self.buf[c.data_pos + start : c.data_pos + end])
        except (ValueError, OverflowError, RecursionError) as err:
            raise self._bad_value(col, f"sample {j}", err) from None

    def values(self, col: int, rows: np.ndarray) -> list:
        """Decode column ``col`` of several samples at once (columns not read as one array)."""
        c = self.columns[col]
        if c.offsets is None:
            size = c.ctype.fixed_size
            starts = (rows * size + c.data_pos).tolist()
            ends = [start + size for start in starts]
        else:
            starts = (c.offsets[rows] + c.data_pos).tolist()
            ends = (c.offsets[rows + 1] + c.data_pos).tolist()
        try:
            return c.ctype.decode_many(self.buf, starts, ends)
        except (ValueError, OverflowError, RecursionError) as err:
            raise self._bad_value(col, "in a batch", err) from None

    def encoded(self, j: int) -> list[bytes]:
        """The stored bytes of every column of sample ``j``, as ``build_shard`` takes them."""
        out = []
        for c in self.columns:
            if c.offsets is None:
                start = c.data_pos + j * c.ctype.fixed_size
                out.append(bytes(self.buf[start : start + c.ctype.fixed_size]))
            else:
                out.append(
                    bytes(
                        self.buf[
                            c.data_pos + int(c.offsets[j]) : c.data_pos + int(c.offsets[j + 1])
                        ]
                    )
                )
        return out

    def sample(self, j: int) -> dict:
        """Decode every column of sample ``j``."""
        if not 0 <= j < self.num_samples:
            raise IndexError(
                f"shard {self.name}: sample {j} out of range 0..{self.num_samples - 1}"
            )
        return {name: self.value(k, j) for k, name in enumerate(self.names)}

    def fixed_array(self, col: int) -> np.ndarray:
        """A fixed-size column as one (num_samples, *shape) array view, zero-copy."""
        array = self._arrays.get(col)
        if array is None:
            dtype, shape = self.columns[col].ctype.array
            array = np.frombuffer(
                self.buf,
                dtype=dtype,
                count=self.num_samples * math.prod(shape),
                offset=self.columns[col].data_pos,
            ).reshape((self.num_samples, *shape))
            self._arrays[col] = array
        return array
