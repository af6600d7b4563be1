"""Every column type round-trips exactly through ShardWriter and StreamingDataset.

Property: for any schema, any samples (empty strings and arrays, extreme integers, signed
zeros and infinities, samples larger than the shard size limit) and any size limit and
compression, reading sample i back (by random access and by in-order iteration) gives the
value written, bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from core_helpers import assert_same_sample, write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamshards import StreamingDataset, load_index
from streamshards.columns import DTYPES

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOAT64 = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, float("inf"), float("-inf"), 5e-324, 1.7976931348623157e308]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def column_type(draw) -> str:
    """A column type string of any kind, fixed-shape ndarrays with 1-3 small dimensions."""
    kind = draw(st.sampled_from(["str", "bytes", "int64", "float64", "json", "ndarray", "fixed"]))
    if kind == "ndarray":
        return f"ndarray:{draw(st.sampled_from(DTYPES))}"
    if kind == "fixed":
        shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
        return f"ndarray:{draw(st.sampled_from(DTYPES))}:" + "x".join(map(str, shape))
    return kind


def value_of(ctype: str) -> st.SearchStrategy:
    """Values that fit a column type, including the edge cases each type has."""
    if ctype == "str":
        return st.text(max_size=40) | st.sampled_from(["", "\u00e9\u6f22\U0001f600", "\0"])
    if ctype == "bytes":
        return st.binary(max_size=60)
    if ctype == "int64":
        return INT64 | st.sampled_from([-(2**63), 2**63 - 1, 0, -1])
    if ctype == "float64":
        return FLOAT64
    if ctype == "json":
        return JSON
    parts = ctype.split(":")
    dtype = np.dtype(parts[1])
    if len(parts) == 3:
        shape = tuple(int(d) for d in parts[2].split("x"))
    else:
        shape = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
    return hnp.arrays(dtype, shape)


@st.composite
def dataset(draw) -> tuple[dict[str, str], list[dict], int, str | None]:
    """A schema, samples that fit it, a shard size limit and a compression."""
    types = draw(st.lists(column_type(), min_size=1, max_size=4))
    columns = {f"c{k}_{t.replace(':', '_')}": t for k, t in enumerate(types)}
    samples = draw(
        st.lists(st.fixed_dictionaries({n: value_of(t) for n, t in columns.items()}), max_size=25)
    )
    size_limit = draw(st.integers(1, 2000))
    compression = draw(st.sampled_from([None, "zstd", "zstd:1"]))
    return columns, samples, size_limit, compression


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dataset())
def test_every_column_type_round_trips(case) -> None:
    columns, samples, size_limit, compression = case
    with tempfile.TemporaryDirectory() as tmp:
        out = write_dataset(
            Path(tmp), columns, samples, size_limit=size_limit, compression=compression
        )
        index = load_index(out)
        assert index.num_samples == len(samples)
        assert all(s.samples > 0 for s in index.shards)
        ds = StreamingDataset(local=out)
        assert len(ds) == len(samples)
        for i, sample in enumerate(samples):
            assert_same_sample(sample, ds[i], columns, f"ds[{i}]")
        read = list(StreamingDataset(local=out))
        assert len(read) == len(samples)
        for i, (sample, got) in enumerate(zip(samples, read)):
            assert_same_sample(sample, got, columns, f"iteration sample {i}")


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=30),
    size_limit=st.integers(1, 4000),
)
def test_shards_respect_the_size_limit_and_keep_oversized_samples_whole(sizes, size_limit):
    """A shard closes before the sample that would push it past the limit; a sample larger
    than the limit gets a shard of its own."""
    samples = [{"blob": bytes([k % 256]) * n} for k, n in enumerate(sizes)]
    with tempfile.TemporaryDirectory() as tmp:
        out = write_dataset(Path(tmp), {"blob": "bytes"}, samples, size_limit=size_limit)
        index = load_index(out)
        assert sum(s.samples for s in index.shards) == len(samples)
        start = 0
        for info in index.shards:
            members = sizes[start : start + info.samples]
            accounted = sum(n + 8 for n in members)
            assert info.samples == 1 or accounted <= size_limit, (info, members)
            start += info.samples
        ds = StreamingDataset(local=out)
        assert [len(ds[i]["blob"]) for i in range(len(ds))] == sizes


def test_ndarray_columns_accept_lists_and_safe_casts(tmp_path: Path) -> None:
    """Python lists and value-preserving casts are stored in the column's dtype."""
    columns = {"fixed": "ndarray:uint16:2x3", "var": "ndarray:float32"}
    samples = [{"fixed": [[1, 2, 3], [4, 5, 65535]], "var": np.arange(4, dtype=np.int16)}]
    ds = StreamingDataset(local=write_dataset(tmp_path, columns, samples))
    got = ds[0]
    assert got["fixed"].dtype == np.uint16 and got["fixed"].tolist() == samples[0]["fixed"]
    assert got["var"].dtype == np.float32 and got["var"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_empty_dataset_has_no_samples(tmp_path: Path) -> None:
    """A writer closed without samples gives a valid dataset of zero shards."""
    write_dataset(tmp_path, {"text": "str"}, [])
    assert load_index(tmp_path).shards == []
    ds = StreamingDataset(local=tmp_path)
    assert len(ds) == 0 and list(ds) == []


def test_fixed_arrays_are_read_only_views_of_the_shard(tmp_path: Path) -> None:
    """F2: a token array is a numpy view into the (memory-mapped) shard, not a copy."""
    tokens = np.arange(4096, dtype=np.uint16).reshape(2, 2048)
    write_dataset(
        tmp_path,
        {"tokens": "ndarray:uint16:2048"},
        [{"tokens": row} for row in tokens],
        compression=None,
    )
    arr = StreamingDataset(local=tmp_path)[1]["tokens"]
    assert not arr.flags.owndata and not arr.flags.writeable
    assert np.array_equal(arr, tokens[1])


def test_a_large_zstd_shard_decompresses_into_a_populated_map_that_outlives_its_view(
    tmp_path: Path,
) -> None:
    """Shards from POPULATE_FROM up decompress into an anonymous map; arrays a reader handed
    out keep it alive and unchanged after the dataset that opened it is gone."""
    import gc
    import mmap

    from streamshards.format import POPULATE_FROM, _new_buffer

    rng = np.random.default_rng(7)
    rows = [rng.integers(0, 2**16, 4096, dtype=np.uint16) for _ in range(300)]  # 2.4 MB raw
    folder = write_dataset(
        tmp_path, {"tokens": "ndarray:uint16:4096"}, [{"tokens": r} for r in rows]
    )
    (info,) = load_index(folder).shards
    assert info.compression == "zstd" and info.raw_bytes >= POPULATE_FROM
    buffer = _new_buffer(POPULATE_FROM)
    assert len(buffer) == POPULATE_FROM
    if hasattr(mmap, "MAP_POPULATE"):  # Linux
        assert isinstance(buffer.base.obj, mmap.mmap)
    ds = StreamingDataset(local=folder)
    kept = [ds[i]["tokens"] for i in (0, 150, 299)]
    del ds
    gc.collect()
    for got, i in zip(kept, (0, 150, 299)):
        np.testing.assert_array_equal(got, rows[i])
    batch = next(StreamingDataset(local=folder, shuffle=True, batch_size=300).iter_batches())
    assert sorted(map(bytes, batch["tokens"])) == sorted(map(bytes, rows))
