"""Bad input gets a clear error that names what to fix: the file, shard, field or column.

F4 (raw size enforced), F7 (shard names stay inside the folder), hash checks before use,
and the writer's refusal of values that do not fit their column.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard
from core_helpers import text_samples, write_dataset

from streamshards import ShardWriter, StreamingDataset, load_index
from streamshards.format import ShardError
from streamshards.index import INDEX_NAME, IndexFormatError

COLUMNS = {"id": "int64", "text": "str"}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A zstd dataset of 60 samples in several shards."""
    return write_dataset(tmp_path / "ds", COLUMNS, text_samples(60), size_limit=1500)


def edit_index(folder: Path, change) -> None:
    """Rewrite index.json after ``change(obj)`` edits its decoded JSON in place."""
    obj = json.loads((folder / INDEX_NAME).read_text())
    change(obj)
    (folder / INDEX_NAME).write_text(json.dumps(obj))


# Index validation -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/abs/shard.ssd", "s3://bucket/x", "a/b", "..", ""])
def test_shard_names_outside_the_folder_are_rejected(dataset: Path, name: str) -> None:
    """F7: an index naming a path, a parent, an absolute path or a URL is refused on load."""
    edit_index(dataset, lambda obj: obj["shards"][1].update(file=name))
    with pytest.raises(IndexFormatError) as err:
        load_index(dataset)
    message = str(err.value)
    assert str(dataset / INDEX_NAME) in message and "shards[1]" in message
    assert repr(name) in message
    with pytest.raises(IndexFormatError):
        StreamingDataset(local=dataset)


def test_malformed_json_names_the_file_and_position(dataset: Path) -> None:
    text = (dataset / INDEX_NAME).read_text()
    (dataset / INDEX_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(IndexFormatError) as err:
        load_index(dataset)
    assert str(dataset / INDEX_NAME) in str(err.value)
    assert re.search(r"line \d+ column \d+", str(err.value)), err.value


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda obj: obj["shards"][2].pop("samples"), "shards[2]: missing field 'samples'"),
        (lambda obj: obj["shards"][0].pop("hash"), "shards[0]: missing field 'hash'"),
        (lambda obj: obj.pop("columns"), "missing field 'columns'"),
        (lambda obj: obj["shards"][0].update(samples="3"), "field 'samples' has type str"),
        (lambda obj: obj["shards"][0].update(raw_bytes=-1), "field 'raw_bytes' is negative"),
        (lambda obj: obj["shards"][0].update(hash={"xxh3_64": "zz"}), "hash.xxh3_64"),
        (lambda obj: obj["shards"][0].update(compression="lz4"), "unknown compression 'lz4'"),
        (lambda obj: obj["columns"].update(text="float32"), "column 'text': unknown type"),
        (lambda obj: obj.update(version=2), "version 2 is not supported"),
        (lambda obj: obj.update(num_samples=61), "num_samples is 61"),
        (lambda obj: obj["shards"].append(obj["shards"][0]), "listed twice"),
        (lambda obj: obj["shards"][0].update(file=INDEX_NAME), "clashes"),
    ],
)
def test_invalid_index_fields_are_named(dataset: Path, change, expected: str) -> None:
    edit_index(dataset, change)
    with pytest.raises(IndexFormatError) as err:
        load_index(dataset)
    assert expected in str(err.value) and str(dataset / INDEX_NAME) in str(err.value)


def test_a_missing_index_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / INDEX_NAME))):
        StreamingDataset(local=tmp_path)


# Shard integrity --------------------------------------------------------------------------


def first_bad_read(folder: Path) -> ShardError:
    """Read every sample and return the error; fail if any sample came back first."""
    ds = StreamingDataset(local=folder)
    with pytest.raises(ShardError) as err:
        for i in range(len(ds)):
            ds[i]
            assert i < load_index(folder).shards[0].samples, "read past the bad shard"
    return err.value


@pytest.mark.parametrize("compression", ["zstd", None])
@pytest.mark.parametrize("damage", ["bit flip", "truncate"])
def test_damaged_shards_are_caught_by_hash_before_use(
    tmp_path: Path, compression: str | None, damage: str
) -> None:
    folder = write_dataset(
        tmp_path, COLUMNS, text_samples(60), size_limit=1500, compression=compression
    )
    info = load_index(folder).shards[1]
    path = folder / info.file
    data = bytearray(path.read_bytes())
    if damage == "bit flip":
        data[len(data) // 2] ^= 0x10
    else:
        del data[-5:]
    path.write_bytes(data)
    error = first_bad_read(folder)
    message = str(error)
    assert info.file in message
    if damage == "truncate":  # a size mismatch names both sizes and reads nothing to hash
        assert f"file is {len(data)} bytes" in message and str(info.stored_bytes) in message
    else:
        assert info.hash in message and xxhash.xxh3_64_hexdigest(bytes(data)) in message


def replace_shard(folder: Path, k: int, stored: bytes, raw_bytes: int) -> None:
    """Put ``stored`` in place of shard ``k`` with an index entry whose hash matches it."""
    info = load_index(folder).shards[k]
    (folder / info.file).write_bytes(stored)
    edit_index(
        folder,
        lambda obj: obj["shards"][k].update(
            stored_bytes=len(stored),
            raw_bytes=raw_bytes,
            hash={"xxh3_64": xxhash.xxh3_64_hexdigest(stored)},
        ),
    )


@pytest.mark.parametrize("content_size", [True, False])
@pytest.mark.parametrize("shortfall", [1, 1000])
def test_shard_that_expands_beyond_its_raw_size_is_refused(
    dataset: Path, content_size: bool, shortfall: int
) -> None:
    """F4: a frame (with or without a declared size) that decompresses to more than the
    index's raw_bytes stops with an error naming the shard, before any of its samples."""
    raw = bytes(range(256)) * 40
    compressor = zstandard.ZstdCompressor(write_checksum=True, write_content_size=content_size)
    replace_shard(dataset, 0, compressor.compress(raw), len(raw) - shortfall)
    error = str(first_bad_read(dataset))
    assert load_index(dataset).shards[0].file in error
    assert str(len(raw) - shortfall) in error


def test_shard_smaller_than_its_raw_size_is_refused(dataset: Path) -> None:
    raw = b"\0" * 5000
    replace_shard(dataset, 0, zstandard.ZstdCompressor().compress(raw), len(raw) + 1)
    assert "5001" in str(first_bad_read(dataset))


def test_shard_with_a_matching_hash_but_a_bad_layout_is_refused(tmp_path: Path) -> None:
    """A shard written by something else (bad magic) fails to open rather than misreading."""
    folder = write_dataset(tmp_path, COLUMNS, text_samples(60), size_limit=1500, compression=None)
    info = load_index(folder).shards[0]
    stored = b"NOTSHARD" + (folder / info.file).read_bytes()[8:]
    replace_shard(folder, 0, stored, len(stored))
    assert "bad magic" in str(first_bad_read(folder))


# The writer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["float32", "ndarray", "ndarray:complex64", "ndarray:uint16:2x-1", "ndarray:int8:a"]
)
def test_unknown_column_types_are_refused(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape("column 'bad'")) as err:
        ShardWriter(tmp_path, {"ok": "str", "bad": spec})
    assert repr(spec) in str(err.value) or spec.split(":")[1] in str(err.value)


FITS = {
    "str": "x",
    "bytes": b"x",
    "int64": 1,
    "float64": 1.0,
    "json": [1],
    "ndarray:uint8": [255],
    "ndarray:int32": [-1],
    "ndarray:uint16": [],
    "ndarray:bool": [0, 1],
    "ndarray:uint16:4": np.ones(4, np.uint16),
    "ndarray:uint16:2x2": [[1, 2], [3, 4]],
}
MISFITS = [
    ("str", "\ud800", "UTF-8"),
    ("str", b"bytes", "expected str"),
    ("bytes", "text", "expected bytes"),
    ("int64", 2**63, "int64"),
    ("int64", -(2**63) - 1, "int64"),
    ("int64", 1.5, "expected int"),
    ("int64", True, "expected int"),
    ("float64", "1.0", "expected float"),
    ("json", float("nan"), "JSON"),
    ("json", {1, 2}, "JSON"),
    ("json", "\udc80", "JSON"),
    ("ndarray:uint8", [256], "above the range"),
    ("ndarray:uint8", [-1], "below the range"),
    ("ndarray:bool", [0, 2], "above the range"),
    ("ndarray:int32", np.array([1.5]), "does not fit"),
    ("ndarray:uint16", ["a"], "does not fit"),
    ("ndarray:uint16:4", np.zeros(5, np.uint16), "shape"),
    ("ndarray:uint16:2x2", np.zeros(4, np.uint16), "shape"),
]


@pytest.mark.parametrize("ctype, value, reason", MISFITS)
def test_a_value_that_does_not_fit_is_refused_naming_the_column(
    tmp_path: Path, ctype: str, value, reason: str
) -> None:
    """The bad sample raises ValueError naming the column; the writer stays usable and the
    dataset holds only the good samples."""
    good = FITS[ctype]
    with ShardWriter(tmp_path, {"id": "int64", "value": ctype}) as writer:
        writer.write({"id": 0, "value": good})
        with pytest.raises(ValueError, match="column 'value'") as err:
            writer.write({"id": 1, "value": value})
        assert reason in str(err.value)
        writer.write({"id": 2, "value": good})
    ds = StreamingDataset(local=tmp_path)
    assert [ds[i]["id"] for i in range(len(ds))] == [0, 2]


def test_missing_and_unknown_columns_are_named(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, {"id": "int64", "text": "str"}) as writer:
        with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]"):
            writer.write({"id": 1})
        with pytest.raises(ValueError, match=r"unknown column\(s\) \['extra'\]"):
            writer.write({"id": 1, "text": "a", "extra": 2})


def test_writer_refuses_to_replace_a_dataset_unless_asked(dataset: Path) -> None:
    with pytest.raises(FileExistsError, match=re.escape(str(dataset / INDEX_NAME))):
        ShardWriter(dataset, COLUMNS)
    assert load_index(dataset).num_samples == 60


def test_an_error_inside_the_writer_block_leaves_no_index(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, COLUMNS, size_limit=100) as writer:
        for sample in text_samples(20):
            writer.write(sample)
        raise RuntimeError("the producer failed")
    assert not (tmp_path / INDEX_NAME).exists()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(text_samples(1)[0])
