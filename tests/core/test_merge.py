"""F6: one sample sequence split into any number of parts merges into the same bytes.

Parts are written by separate ShardWriters (with their own, different shard sizes); the
merged shards must be byte-identical to each other and to what one writer produces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from core_helpers import run_cli, write_dataset

from streamshards import StreamingDataset, load_index, merge
from streamshards.index import INDEX_NAME

COLUMNS = {"id": "int64", "text": "str", "tokens": "ndarray:uint16", "meta": "json"}


def samples(count: int = 120) -> list[dict]:
    rng = np.random.default_rng(7)
    return [
        {
            "id": k,
            "text": "\u00e9t\u00e9 " * int(rng.integers(0, 40)),
            "tokens": rng.integers(0, 65535, int(rng.integers(0, 300)), dtype=np.uint16),
            "meta": {"k": k, "tags": ["a"] * (k % 3)},
        }
        for k in range(count)
    ]


def write_parts(root: Path, cuts: list[int]) -> Path:
    """Split the sample sequence at ``cuts`` and write each piece as its own dataset."""
    data = samples()
    bounds = [0, *cuts, len(data)]
    for part, (start, end) in enumerate(zip(bounds, bounds[1:])):
        write_dataset(
            root / f"part{part:02d}",
            COLUMNS,
            data[start:end],
            size_limit=500 + 700 * part,
            compression=None if part % 2 else "zstd:5",
            provenance={"part": part},
        )
    return root


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != INDEX_NAME}


@pytest.mark.parametrize("compression", ["zstd", None])
def test_merge_is_byte_identical_whatever_the_number_of_parts(
    tmp_path: Path, compression: str | None
) -> None:
    single = write_dataset(
        tmp_path / "single", COLUMNS, samples(), size_limit="4KB", compression=compression
    )
    merged = {}
    for cuts in ([], [61], [13, 90], [1, 2, 119]):
        parts = write_parts(tmp_path / f"parts{len(cuts) + 1}", cuts)
        out = tmp_path / f"merged{len(cuts) + 1}"
        merge([parts], out, compression=compression, size_limit="4KB")
        merged[len(cuts) + 1] = out
    expected_files = shard_files(single)
    expected_shards = load_index(single).to_dict()["shards"]
    assert len(expected_files) > 5
    for count, out in merged.items():
        assert shard_files(out) == expected_files, f"{count} parts"
        assert load_index(out).to_dict()["shards"] == expected_shards, f"{count} parts"
    ds = StreamingDataset(local=merged[4])
    assert [ds[i]["id"] for i in range(len(ds))] == list(range(len(samples())))
    part_provenance = load_index(merged[4]).provenance["parts"]
    assert [p["part"] for p in part_provenance] == [0, 1, 2, 3]


def test_merge_cli_matches_the_python_function(tmp_path: Path) -> None:
    """`streamshards merge PARTS... --out` takes dataset folders in the order given."""
    parts = write_parts(tmp_path / "parts", [40, 41])
    merge([parts], tmp_path / "by_function", size_limit="3KB")
    named = [str(parts / name) for name in ("part00", "part01", "part02")]
    result = run_cli("merge", *named, "--out", str(tmp_path / "by_cli"), "--size-limit", "3KB")
    assert result.returncode == 0, result.stderr
    assert "120 samples" in result.stdout
    assert shard_files(tmp_path / "by_cli") == shard_files(tmp_path / "by_function")


@pytest.mark.parametrize(
    "other",
    [{"a": "str", "b": "str"}, {"b": "bytes", "a": "str"}],
    ids=["another type", "another order"],
)
def test_merge_refuses_parts_with_different_columns(tmp_path: Path, other: dict) -> None:
    """Parts must share the schema, column order included (samples are copied encoded)."""
    write_dataset(tmp_path / "a", {"a": "str", "b": "bytes"}, [{"a": "x", "b": b"y"}])
    write_dataset(
        tmp_path / "b", other, [{"a": "x", "b": b"y" if "bytes" in other.values() else "y"}]
    )
    with pytest.raises(ValueError, match="columns") as err:
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert str(tmp_path / "b") in str(err.value)
    assert not (tmp_path / "out" / INDEX_NAME).exists()


def test_identical_writes_give_identical_indexes(tmp_path: Path, monkeypatch) -> None:
    """With SOURCE_DATE_EPOCH set, writing the same samples twice gives the same index bytes."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = write_dataset(tmp_path / "a", COLUMNS, samples(), size_limit="2KB")
    second = write_dataset(tmp_path / "b", COLUMNS, samples(), size_limit="2KB")
    assert (first / INDEX_NAME).read_bytes() == (second / INDEX_NAME).read_bytes()
    assert load_index(first).provenance["created"] == "2023-11-14T22:13:20Z"
