"""Damaged shards and hostile foreign indexes give errors that name the shard or the field."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from streamshards import Stream, StreamingDataset
from streamshards.format import ShardError
from streamshards.index import IndexFormatError


def edit_index(folder: Path, change) -> None:
    path = folder / "index.json"
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x20
    path.write_bytes(bytes(data))


def read_all(folder: Path, **options) -> list:
    ds = StreamingDataset(streams=[Stream(local=str(folder), options=options)])
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("mds_text", "shard.00003.mds"),  # sha1 + xxh64
        ("mds_merged", "1/shard.00001.mds"),  # md5 + xxh3_64
        ("mds_types", "shard.00002.mds"),  # md5
        ("mds_text_zstd", "shard.00003.mds.zstd"),  # the compressed file's hashes
    ],
)
def test_flipped_byte_in_hashed_shard_names_it(fixture_copy, name, file):
    folder = fixture_copy(name)
    flip(folder / file, (folder / file).stat().st_size - 3)
    with pytest.raises(ShardError, match=rf"shard {file}: hash mismatch"):
        read_all(folder)


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("mds_text", ["shards", 1, "raw_data", "basename"]),
        ("litdata_pytree", ["chunks", 1, "filename"]),
    ],
)
@pytest.mark.parametrize("bad", ["../outside.mds", "/etc/passwd", "0/../../x", "s3://b/x"])
def test_paths_outside_the_folder_are_refused(fixture_copy, name, path, bad):
    folder = fixture_copy(name)

    def change(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = bad

    edit_index(folder, change)
    with pytest.raises(IndexFormatError, match="not a relative path inside the dataset folder"):
        read_all(folder)


def test_merged_subfolder_paths_are_allowed():
    from interop_helpers import FIXTURES

    ds = StreamingDataset(local=str(FIXTURES / "mds_merged" / "data"))
    assert ds.sources[0].index.shards[3].file == "1/shard.00000.mds"


def test_sample_count_that_disagrees_with_the_shard(fixture_copy):
    folder = fixture_copy("mds_tokens_bytes_int64")  # no hashes: only the layout checks it

    def change(obj):
        obj["shards"][0]["samples"] = 30

    edit_index(folder, change)
    with pytest.raises(ShardError, match=r"shard shard.00000.mds: header says 31 samples"):
        read_all(folder)


def test_offsets_that_do_not_match_the_sizes(fixture_copy):
    folder = fixture_copy("mds_tokens_bytes_int64")
    shard = folder / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    (second,) = struct.unpack_from("<I", data, 8)
    struct.pack_into("<I", data, 8, second + 8)  # sample 0 now claims 8 more bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard shard.00000.mds: sample 0's column sizes"):
        read_all(folder)


def test_offsets_past_the_end_of_the_file(fixture_copy):
    folder = fixture_copy("mds_tokens_bytes_int64")
    shard = folder / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    struct.pack_into("<I", data, 4 * 30, 10**8)  # the last offset of 29 samples
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard shard.00001.mds: .*past the file"):
        read_all(folder)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("mds_text", lambda o: o["shards"][0]["raw_data"].update(bytes=99999), "index says 99999"),
        ("litdata_pytree", lambda o: o["chunks"][2].update(chunk_bytes=99999), "index says 99999"),
        ("litdata_tokens", lambda o: o["chunks"][0].update(dim=99999), "run past the chunk"),
        ("litdata_text", lambda o: o["chunks"][0].update(chunk_size=70), "header says 68"),
    ],
)
def test_sizes_past_the_file(fixture_copy, name, change, message):
    folder = fixture_copy(name)
    edit_index(folder, change)
    options = {"block_size": 65} if name == "litdata_tokens" else {}
    with pytest.raises(ShardError, match=message):
        read_all(folder, **options)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "litdata_pytree",
            lambda o: o["config"].update(encryption={"algorithm": "fernet", "level": "chunk"}),
            "encrypted",
        ),
        ("mds_text", lambda o: o["shards"][0].update(compression="br"), "'br' is not supported"),
        ("mds_text", lambda o: o["shards"][2].update(column_names=["a", "b", "c"]), "differ"),
        ("mds_text", lambda o: o["shards"][0].update(column_sizes=[4, None, None]), "column_sizes"),
        ("mds_text", lambda o: o["shards"][1].update(samples=-1), "negative"),
        (
            "mds_text",
            lambda o: o["shards"][0].update(column_encodings=["int", "jpeg", "str"]),
            "JPEG",
        ),
        ("litdata_pytree", lambda o: o["config"].update(item_loader="ParquetLoader"), "Parquet"),
        ("litdata_pytree", lambda o: o["config"].update(data_format=["str"]), "leaves"),
    ],
)
def test_hostile_index_fields(fixture_copy, name, change, message):
    folder = fixture_copy(name)
    edit_index(folder, change)
    with pytest.raises(IndexFormatError, match=message):
        read_all(folder)


def test_token_row_of_another_length(fixture_copy):
    """Rows are listed with the first row's length; a longer one is an error naming both."""
    folder = fixture_copy("mds_tokens_bytes_int64")  # no hashes: only the layout checks it
    shard = folder / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    offsets = list(struct.unpack_from("<32I", data, 4))
    offsets[2] += 8  # sample 1 takes 8 more bytes (one more id), sample 2 eight fewer
    struct.pack_into("<I", data, 4 + 4 * 2, offsets[2])
    struct.pack_into("<I", data, offsets[1], offsets[2] - offsets[1] - 4)
    struct.pack_into("<I", data, offsets[2], offsets[3] - offsets[2] - 4)
    shard.write_bytes(bytes(data))
    ds = StreamingDataset(local=str(folder), batch_size=4)
    assert ds.columns == {"tokens": "ndarray:int64:129"}
    with pytest.raises(ShardError, match=r"shard shard.00000.mds: column 'tokens' of sample 1"):
        list(ds.iter_batches())
    with pytest.raises(ShardError, match=r"shard shard.00000.mds: .*shape \(130,\)"):
        ds[1]


def test_a_fifo_in_a_shards_place_is_refused(fixture_copy):
    import os

    folder = fixture_copy("mds_text")
    (folder / "shard.00001.mds").unlink()
    os.mkfifo(folder / "shard.00001.mds")
    with pytest.raises(ShardError, match=r"shard shard.00001.mds: .* not a regular file"):
        read_all(folder)


def test_framed_zstd_chunk_with_a_bad_frame_table(fixture_copy):
    folder = fixture_copy("litdata_pytree_zstd")
    chunk = folder / "chunk-0-0.bin"
    data = bytearray(chunk.read_bytes())
    table = 24 + 4 * (8 + 1)  # header, then 9 offsets of 8 items
    (raw,) = struct.unpack_from("<I", data, table + 20)
    struct.pack_into("<I", data, table + 20, raw + 100)
    chunk.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard chunk-0-0.bin: frame 0's sizes disagree"):
        read_all(folder)


@pytest.mark.parametrize(
    ("name", "path"),
    [("mds_text", ("shards", "samples")), ("litdata_text", ("chunks", "chunk_size"))],
)
def test_sample_counts_past_what_ids_can_count(fixture_copy, name, path):
    folder = fixture_copy(name)

    def change(obj):
        obj[path[0]][0][path[1]] = 2**62
        obj[path[0]][1][path[1]] = 2**62

    edit_index(folder, change)
    with pytest.raises(IndexFormatError, match=r"2\*\*63 - 1"):
        read_all(folder)
