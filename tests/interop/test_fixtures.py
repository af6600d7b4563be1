"""Every MDS and LitData fixture reads back as the peer library read it: order, len, ds[i]."""

from __future__ import annotations

import mmap
import pickle

import numpy as np
import pytest
from interop_helpers import FIXTURES, NAMES, comparable, expected, expected_samples, options

from streamshards import Stream, StreamingDataset
from streamshards.format import ShardError
from streamshards.index import IndexFormatError
from streamshards.interop.common import SMALL_FILE, map_file


def open_fixture(name: str, **kwargs) -> StreamingDataset:
    stream = Stream(local=str(FIXTURES / name / "data"), options=options(name))
    return StreamingDataset(streams=[stream], **kwargs)


def test_every_fixture_is_covered():
    assert len(NAMES) == 12


@pytest.mark.parametrize("name", NAMES)
def test_random_access_equals_the_library(name):
    ds = open_fixture(name)
    assert len(ds) == expected(name)["num_samples"]
    assert [comparable(name, ds[i]) for i in range(len(ds))] == expected_samples(name)


@pytest.mark.parametrize("name", NAMES)
def test_iteration_is_the_stored_order(name):
    ds = open_fixture(name, batch_size=7)
    assert [comparable(name, s) for s in ds] == expected_samples(name)


@pytest.mark.parametrize("name", ["mds_types", "litdata_pytree", "mds_tokens_int32"])
def test_batches_hold_native_arrays(name):
    """Fixed-size columns come as one array per batch, with the dtype the schema lists."""
    ds = open_fixture(name, batch_size=5)
    batch = next(ds.iter_batches())
    for column, ctype in zip(ds.columns, ds.column_types):
        if ctype.array is not None:
            assert batch[column].dtype == ctype.array[0]
            assert batch[column].shape == (5, *ctype.array[1])


@pytest.mark.parametrize(
    ("name", "column"),
    [("mds_tokens_int32", "ndarray:int32:129"), ("mds_tokens_bytes_int64", "ndarray:int64:129")],
)
def test_token_rows_are_fixed_length_integer_rows(name, column):
    """LLM Foundry's tokens, current (ndarray:int32) and legacy (int64 bytes), come out as
    fixed-length integer rows, views of the shard's bytes (no copy per row)."""
    ds = open_fixture(name, batch_size=8)
    assert ds.columns == {"tokens": column}
    row = ds[0]["tokens"]
    assert isinstance(row, np.ndarray) and row.shape == (129,)
    batch = next(ds.iter_batches())
    assert batch["tokens"].shape == (8, 129) and batch["tokens"].dtype == row.dtype
    rows = ds.sources[0].open_view(0).fixed_array(0)
    assert not rows.flags.owndata and rows.base is not None  # a view of the shard file


def test_litdata_tokens_serve_whole_blocks_per_chunk():
    """Blocks never span chunks; each chunk's tail is never served, as in litdata."""
    exp = expected("litdata_tokens")
    ds = open_fixture("litdata_tokens")
    assert ds.columns == {"tokens": f"ndarray:uint16:{exp['block_size']}"}
    assert [s.samples for s in ds.sources[0].index.shards] == [
        c["blocks_served"] for c in exp["chunks"]
    ]
    provenance = ds.sources[0].index.provenance
    assert provenance["leftover_tokens_never_served"] == exp["total_tokens"] - exp["served_tokens"]


def test_litdata_tokens_need_a_block_size():
    with pytest.raises(ValueError, match="block_size"):
        StreamingDataset(local=str(FIXTURES / "litdata_tokens" / "data"))
    stream = Stream(local=str(FIXTURES / "mds_text" / "data"), options={"block_size": 8})
    with pytest.raises(ValueError, match="block_size"):
        StreamingDataset(streams=[stream])


def test_pickle_is_refused_by_default_and_never_unpickled():
    with pytest.raises(IndexFormatError, match=r"'pyobj'.*pkl_as_bytes=True"):
        StreamingDataset(local=str(FIXTURES / "mds_pkl" / "data"))
    ds = open_fixture("mds_pkl")
    assert ds.columns["pyobj"] == "bytes"
    raw = ds[0]["pyobj"]
    assert isinstance(raw, bytes)
    assert pickle.loads(raw) == expected("mds_pkl")["samples"][0]["pyobj"]


def test_foreign_and_native_streams_mix(tmp_path):
    """An MDS stream and a native one with the same columns mix in one dataset."""
    from streamshards import ShardWriter

    with ShardWriter(tmp_path / "native", {"n": "int64", "text": "str"}) as writer:
        for i in range(10):
            writer.write({"n": 1000 + i, "text": f"native {i}"})
    streams = [
        Stream(local=str(FIXTURES / "mds_merged" / "data")),
        Stream(local=str(tmp_path / "native")),
    ]
    ds = StreamingDataset(streams=streams, shuffle=True, seed=3)
    seen = sorted(s["n"] for s in ds)
    assert seen == sorted(
        [s["n"] for s in expected("mds_merged")["samples"]] + list(range(1000, 1010))
    )


@pytest.mark.parametrize("name", ["mds_types", "litdata_pytree_zstd"])
def test_spawned_loader_workers_read_foreign_shards(name):
    """The foreign readers pickle into spawned worker processes and read the same samples."""
    import multiprocessing

    from streamshards import StreamingDataLoader

    ds = open_fixture(name, batch_size=4)
    context = multiprocessing.get_context("spawn")
    loader = StreamingDataLoader(ds, num_workers=2, multiprocessing_context=context)
    got = [
        comparable(name, {k: v[i] for k, v in batch.items()})
        for batch in loader
        for i in range(len(next(iter(batch.values()))))
    ]
    assert got == expected_samples(name)


def test_small_shard_files_are_read_large_ones_mapped(tmp_path):
    """A small shard costs less read in one call than mapped; a large one is mapped, not copied."""
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"s" * SMALL_FILE)
    large.write_bytes(b"l" * (SMALL_FILE + 1))
    data = map_file(small, "small", SMALL_FILE)
    assert isinstance(data, bytes) and data == small.read_bytes()
    assert isinstance(map_file(large, "large", SMALL_FILE + 1), mmap.mmap)
    with pytest.raises(ShardError, match="shard small: file is 1048576 bytes, index says 7"):
        map_file(small, "small", 7)
