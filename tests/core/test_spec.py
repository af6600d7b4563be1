"""docs/FORMAT.md is precise enough to read a dataset: an independent reader written from the
spec alone (struct, json, zstd, xxhash; nothing from streamshards) reads what ShardWriter
wrote, and the spec's worked example is what the writer produces."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard
from core_helpers import assert_same_sample, write_dataset

SIZES = {"int64": (8, "<q"), "float64": (8, "<d")}


def parse_type(spec: str) -> tuple[str, np.dtype | None, tuple[int, ...] | None]:
    if not spec.startswith("ndarray:"):
        return spec, None, None
    _, dtype, *shape = spec.split(":")
    dims = tuple(int(d) for d in shape[0].split("x")) if shape else None
    return "ndarray", np.dtype(dtype).newbyteorder("<"), dims


def decode(kind: str, dtype, shape, raw: bytes):
    if kind == "str":
        return raw.decode("utf-8")
    if kind == "bytes":
        return raw
    if kind in SIZES:
        return struct.unpack(SIZES[kind][1], raw)[0]
    if kind == "json":
        return json.loads(raw.decode("utf-8"))
    if shape is not None:
        return np.frombuffer(raw, dtype).reshape(shape)
    (ndim,) = struct.unpack_from("<Q", raw)
    dims = struct.unpack_from(f"<{ndim}Q", raw, 8)
    return np.frombuffer(raw, dtype, math.prod(dims), 8 + 8 * ndim).reshape(dims)


def read_dataset(folder: Path) -> list[dict]:
    """Every sample of a dataset, read by following docs/FORMAT.md."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    assert index["format"] == "streamshards" and index["version"] == 1
    names = list(index["columns"])
    types = [parse_type(index["columns"][n]) for n in names]
    samples = []
    for entry in index["shards"]:
        stored = (folder / entry["file"]).read_bytes()
        assert len(stored) == entry["stored_bytes"]
        assert xxhash.xxh3_64_hexdigest(stored) == entry["hash"]["xxh3_64"]
        raw = stored
        if entry.get("compression") == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(stored)
            raw = reader.read(entry["raw_bytes"] + 1)
        assert len(raw) == entry["raw_bytes"]
        magic, count, ncols, _ = struct.unpack_from("<8sQII", raw)
        assert (magic, count, ncols) == (b"SSHARD01", entry["samples"], len(names))
        columns = []
        for k, (kind, dtype, shape) in enumerate(types):
            offsets_pos, data_pos, data_bytes = struct.unpack_from("<QQQ", raw, 24 + 24 * k)
            assert data_pos % 64 == 0 and (offsets_pos % 64 == 0)
            if kind in SIZES or shape is not None:
                size = SIZES[kind][0] if kind in SIZES else math.prod(shape) * dtype.itemsize
                assert offsets_pos == 0 and data_bytes == size * count
                spans = [(data_pos + j * size, data_pos + (j + 1) * size) for j in range(count)]
            else:
                offsets = struct.unpack_from(f"<{count + 1}Q", raw, offsets_pos)
                assert offsets[0] == 0 and offsets[-1] == data_bytes
                spans = [(data_pos + a, data_pos + b) for a, b in zip(offsets, offsets[1:])]
            columns.append([decode(kind, dtype, shape, raw[a:b]) for a, b in spans])
        samples += [dict(zip(names, values)) for values in zip(*columns)]
    return samples


ALL_TYPES = {
    "text": "str",
    "blob": "bytes",
    "n": "int64",
    "x": "float64",
    "meta": "json",
    "tokens": "ndarray:uint16:4",
    "image": "ndarray:float32:2x3",
    "ragged": "ndarray:int32",
    "flags": "ndarray:bool",
}


def all_type_samples(count: int) -> list[dict]:
    rng = np.random.default_rng(3)
    return [
        {
            "text": "\u00e9\u6f22" * k,
            "blob": bytes(range(k % 256)),
            "n": (-1) ** k * 2**62,
            "x": [float("inf"), -0.0, 1e-300][k % 3],
            "meta": {"k": k, "list": [None, True, 1.5]},
            "tokens": rng.integers(0, 65535, 4).astype(np.uint16),
            "image": rng.random((2, 3)).astype(np.float32),
            "ragged": np.arange(k % 5 * 2, dtype=np.int32).reshape(-1, 2) if k % 3 else [],
            "flags": rng.random(k % 4) < 0.5,
        }
        for k in range(count)
    ]


@pytest.mark.parametrize("compression", ["zstd", None])
def test_a_reader_written_from_the_spec_reads_what_the_writer_wrote(
    tmp_path: Path, compression: str | None
) -> None:
    samples = all_type_samples(50)
    write_dataset(tmp_path, ALL_TYPES, samples, size_limit=2000, compression=compression)
    read = read_dataset(tmp_path)
    assert len(read) == len(samples)
    for i, (expected, actual) in enumerate(zip(samples, read)):
        assert_same_sample(expected, actual, ALL_TYPES, f"spec reader sample {i}")


def test_the_worked_example_in_the_spec_is_what_the_writer_writes(tmp_path: Path) -> None:
    columns = {"id": "int64", "text": "str", "tokens": "ndarray:uint16"}
    samples = [
        {"id": 7, "text": "hi", "tokens": np.array([1, 2, 3], np.uint16)},
        {"id": -1, "text": "\u00e9", "tokens": np.zeros(0, np.uint16)},
    ]
    write_dataset(tmp_path, columns, samples, compression=None)
    raw = (tmp_path / "shard.000000.ssd").read_bytes()
    spec = (Path(__file__).parents[2] / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    assert len(raw) == 424 and "written without compression (424 bytes)" in spec
    assert xxhash.xxh3_64_hexdigest(raw) == "39ffa28bae2ff8a3" and "39ffa28bae2ff8a3" in spec
    for line in spec.split("### Worked example")[1].split("```")[1].splitlines():
        offset, _, rest = line.partition(": ")
        words = rest.split("   ")[0].replace("  ", " ").split()
        if not words or "..." in rest:
            continue
        expected = bytes.fromhex("".join(words))
        start = int(offset, 16)
        assert raw[start : start + len(expected)] == expected, line
