"""Fuzzing shards whose index is edited to match them: exact data or a ShardError, nothing else.

Each case flips, overwrites, truncates or extends a valid shard and recomputes the index's
hash and sizes, so the hash check passes and only the reader's own checks remain. A zstd
shard must read back exactly the original samples or raise a ShardError naming the shard
(the frame's checksum covers the content). An uncompressed shard has no second checksum, so
its edited bytes are the data: the reader must return exactly what an independent reading
of FORMAT.md gives for them, or a ShardError naming the shard when the spec refuses them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamshards import ShardWriter, load_index
from streamshards.columns import decode, parse_column_type
from streamshards.format import ShardError, stored_hash
from streamshards.index import Index
from streamshards.reader import open_shard

COLUMNS = {
    "id": "int64",
    "text": "str",
    "tokens": "ndarray:uint16",
    "meta": "json",
    "vec": "ndarray:float32:2",
}
SAMPLES = [
    {
        "id": 7 * k - 20,
        "text": "é漢" * k + f" sample {k}",
        "tokens": np.arange(k % 5 * 3, dtype=np.uint16).reshape(-1, 3)[: k % 4],
        "meta": {"k": k, "tags": ["a"] * (k % 3)},
        "vec": np.array([k, -k / 3], dtype=np.float32),
    }
    for k in range(12)
]
VARIABLE = [k for k, t in enumerate(COLUMNS.values()) if parse_column_type(t).fixed_size is None]

U64 = st.sampled_from([0, 1, 7, 8, 64, 2**32, 2**63, 2**64 - 1, 2**64 - 8, 2**64 - 64])
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("overwrite"), st.integers(0, 2**20), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("u64"), st.integers(0, 2**20), U64 | st.integers(0, 2**64 - 1)),
    st.tuples(st.just("truncate"), st.integers(1, 2**20)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=16)),
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    """Apply one mutation; positions wrap around the data's length."""
    kind, *args = mutation
    out = bytearray(data)
    if kind == "extend":
        return bytes(out + args[0])
    if not out:
        return b""
    if kind == "flip":
        out[args[0] % len(out)] ^= 1 << args[1]
    elif kind == "overwrite":
        pos = args[0] % len(out)
        out[pos : pos + len(args[1])] = args[1]
    elif kind == "u64":
        if len(out) >= 8:
            struct.pack_into("<Q", out, 8 * (args[0] % (len(out) // 8)), args[1])
    else:
        del out[len(out) - args[0] % (len(out) + 1) :]
    return bytes(out)


@dataclass
class Shard:
    """A one-shard dataset of SAMPLES: a folder to write edits to, the bytes and the index."""

    folder: Path
    stored: bytes = field(repr=False)
    index: Index = field(repr=False)


@pytest.fixture(scope="module", params=["zstd", None], ids=["zstd", "uncompressed"])
def shard(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Shard:
    folder = tmp_path_factory.mktemp("fuzz")
    with ShardWriter(folder / "ds", COLUMNS, compression=request.param) as writer:
        for sample in SAMPLES:
            writer.write(sample)
    index = load_index(folder / "ds")
    assert len(index.shards) == 1
    return Shard(folder, (folder / "ds" / index.shards[0].file).read_bytes(), index)


def read_back(folder: Path, stored: bytes, index: Index) -> list | None:
    """Every sample (one by one, then each variable column in one batch) of ``stored``
    under an index entry matching its hash and sizes; None on a ShardError naming it."""
    info = index.shards[0]
    info = info._replace(stored_bytes=len(stored), hash=stored_hash(stored))
    if info.compression is None:
        info = info._replace(raw_bytes=len(stored))
    (folder / info.file).write_bytes(stored)
    try:
        view = open_shard(folder / info.file, info, Index(index.columns, [info]))
        rows = np.arange(view.num_samples)
        return [view.sample(j) for j in rows.tolist()] + [view.values(k, rows) for k in VARIABLE]
    except ShardError as err:
        assert info.file in str(err), err
        return None


def spec_read(raw: bytes) -> list | None:
    """The samples FORMAT.md section 2 gives for a raw shard, None where a reader must
    refuse it; plain Python integers, so no sum can wrap."""
    types = [parse_column_type(t) for t in COLUMNS.values()]
    if len(raw) < 24 + 24 * len(types):
        return None
    magic, n, ncols, _ = struct.unpack_from("<8sQII", raw)
    if magic != b"SSHARD01" or n != len(SAMPLES) or ncols != len(types):
        return None
    columns = []
    for k, ctype in enumerate(types):
        offsets_pos, data_pos, data_bytes = struct.unpack_from("<QQQ", raw, 24 + 24 * k)
        if data_pos + data_bytes > len(raw):
            return None
        size = ctype.fixed_size
        if size is not None:
            if size * n != data_bytes:
                return None
            offsets = [size * j for j in range(n + 1)]
        else:
            if offsets_pos == 0 or offsets_pos + 8 * (n + 1) > len(raw):
                return None
            offsets = list(struct.unpack_from(f"<{n + 1}Q", raw, offsets_pos))
            if offsets[0] != 0 or offsets[n] != data_bytes:
                return None
            if any(b < a for a, b in zip(offsets, offsets[1:])):
                return None
        try:
            columns.append(
                [
                    decode(memoryview(raw[data_pos + a : data_pos + b]), ctype)
                    for a, b in zip(offsets, offsets[1:])
                ]
            )
        except (ValueError, OverflowError):
            return None
    samples = [dict(zip(COLUMNS, values)) for values in zip(*columns)]
    return samples + [columns[k] for k in VARIABLE]


def same(a, b) -> bool:
    """Exact equality of read-back values: arrays by dtype, shape and bytes."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    return type(a) is type(b) and a == b


@settings(max_examples=1500, deadline=None)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
@example(mutations=[("overwrite", 4, b"|")])  # zstd: a reserved bit in the frame header
def test_a_mutated_shard_reads_back_exactly_or_is_refused(shard: Shard, mutations: list) -> None:
    folder, stored, index = shard.folder, shard.stored, shard.index
    original = read_back(folder, stored, index)
    assert original is not None and same(original[: len(SAMPLES)], SAMPLES)
    edited = stored
    for mutation in mutations if index.shards[0].compression is None else mutations[:1]:
        edited = mutate(edited, mutation)
    got = read_back(folder, edited, index)
    if index.shards[0].compression is None:
        expected = spec_read(edited)
        assert (got is None) == (expected is None), (got, expected)
        assert got is None or same(got, expected)
    else:
        assert got is None or same(got, original)
