"""Hostile index.json values get one clear error naming the index file and the field.

Never a raw Python exception, from load_index, StreamingDataset, `inspect` or `verify`;
`verify` still prints one `BAD name: reason` line per bad shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile_helpers import write
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshards import StreamingDataset, load_index
from streamshards.cli import main
from streamshards.columns import parse_column_type
from streamshards.format import ShardError
from streamshards.index import (
    INDEX_NAME,
    MAX_ZSTD_RATIO,
    IndexFormatError,
    _all_shards_at_once,
    _each_shard,
    min_raw_bytes,
)


def edit_index(folder: Path, change) -> None:
    obj = json.loads((folder / INDEX_NAME).read_text())
    change(obj)
    (folder / INDEX_NAME).write_text(json.dumps(obj))


def entry(field: str, value):
    return lambda obj: obj["shards"][0].update({field: value})


CASES = [
    ("samples 2**63-1", entry("samples", 2**63 - 1), ["shards[0]", "field 'samples'"]),
    ("samples 2**64", entry("samples", 2**64), ["shards[0]", "field 'samples'", "2**63"]),
    ("raw_bytes 2**40", entry("raw_bytes", 2**40), ["shards[0]", "field 'raw_bytes'"]),
    ("samples 60.0", entry("samples", 60.0), ["shards[0]", "field 'samples' has type float"]),
    ("num_samples 60.0", lambda obj: obj.update(num_samples=60.0), ["field 'num_samples'"]),
    ("stored_bytes true", entry("stored_bytes", True), ["field 'stored_bytes' has type bool"]),
    ("provenance list", lambda obj: obj.update(provenance=[1]), ["field 'provenance'"]),
    ("provenance string", lambda obj: obj.update(provenance="x"), ["field 'provenance'"]),
    (
        "name with newline",
        lambda obj: obj["shards"][0].update(file=obj["shards"][0]["file"] + "\n"),
        ["shards[0]", "not a plain file name"],
    ),
    (
        "two names in one",  # each half is a plain name: only the whole name may be checked
        lambda obj: obj["shards"][1].update(file="shard.a\nshard.b"),
        ["shards[1]", "not a plain file name"],
    ),
    (
        "hash of 15 and 17 digits",
        lambda obj: [
            obj["shards"][k]["hash"].update(xxh3_64=digest)
            for k, digest in ((0, "0" * 15), (1, "0" * 17))
        ],
        ["shards[0]", "field 'hash.xxh3_64'"],
    ),
    ("columns list", lambda obj: obj.update(columns=["id"]), ["field 'columns'"]),
    ("shards object", lambda obj: obj.update(shards={}), ["field 'shards'"]),
]


def hostile_index(folder: Path, case: str) -> None:
    """Apply one hostile edit to the index at ``folder``."""
    if case == "nested 100k deep":
        obj = json.loads((folder / INDEX_NAME).read_text())
        obj["provenance"] = {"x": None}
        deep = "[" * 100_000 + "]" * 100_000
        (folder / INDEX_NAME).write_text(json.dumps(obj).replace("null", deep))
    elif case == "index is a directory":
        (folder / INDEX_NAME).unlink()
        (folder / INDEX_NAME).mkdir()
    else:
        edit_index(folder, {name: change for name, change, _ in CASES}[case])


ALL = [
    *[(name, expected) for name, _, expected in CASES],
    ("nested 100k deep", ["nested too deeply"]),
    ("index is a directory", ["is a directory"]),
]


@pytest.mark.parametrize("case, expected", ALL, ids=[name for name, _ in ALL])
def test_hostile_index_values_are_named(tmp_path: Path, case: str, expected: list[str]) -> None:
    folder = write(tmp_path / "ds")
    hostile_index(folder, case)
    for load in (load_index, lambda f: StreamingDataset(local=f)):
        with pytest.raises(IndexFormatError) as err:
            load(folder)
        message = str(err.value)
        assert str(folder / INDEX_NAME) in message, message
        for part in expected:
            assert part in message, message
    for command in ("inspect", "verify"):
        result = CliRunner().invoke(main, [command, str(folder)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and str(folder / INDEX_NAME) in lines[0], result.output


@pytest.mark.parametrize("target", ["index", "folder"])
def test_an_index_or_dataset_path_that_is_a_fifo_is_refused_at_once(
    tmp_path: Path, target: str
) -> None:
    folder = write(tmp_path / "ds")
    path = folder / INDEX_NAME if target == "index" else tmp_path / "fifo"
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    with pytest.raises(IndexFormatError, match="is a FIFO"):
        load_index(path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and "is a FIFO" in result.output, result.output


def test_zstd_compression_on_an_uncompressed_shard_is_named(tmp_path: Path) -> None:
    """The index says zstd but the file is a raw shard: a ShardError naming the shard and
    the field, and one BAD line from verify for each shard."""
    folder = write(tmp_path / "ds", compression=None)
    shards = load_index(folder).shards
    edit_index(folder, lambda obj: [s.update(compression="zstd") for s in obj["shards"]])
    with pytest.raises(ShardError) as err:
        StreamingDataset(local=folder)[0]
    assert shards[0].file in str(err.value) and "not a zstd frame" in str(err.value)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert [line.split(":")[0] for line in bad] == [f"BAD {s.file}" for s in shards]
    assert all("compression" in line for line in bad), bad


_R = MAX_ZSTD_RATIO
_SIZES = [-1, 0, 1, 55, 56, 64, 72, _R, _R + 1, 2 * _R + 1, 2**63 - 1, 2**63, True, 7.0]
_HOSTILE_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "file": st.sampled_from(["a", "b", INDEX_NAME, "../a", "a\nb", "", 7]),
        "samples": st.sampled_from([-1, 0, 1, 2, 2**62, 2**63 - 1, 2**63, False, 1.0]),
        "raw_bytes": st.sampled_from(_SIZES),
        "stored_bytes": st.sampled_from(_SIZES),
        "hash": st.sampled_from([{"xxh3_64": "0" * 16}, {"xxh3_64": "0" * 15}, {}, "0" * 16]),
        "compression": st.sampled_from([None, "zstd", "gzip", ["zstd"], {"zstd": 1}]),
    },
)


@st.composite
def _plausible_entry(draw) -> dict:
    """An entry on the edge of valid: sizes at and around what its sample count needs, and
    zstd sizes at and around the most a frame can expand."""
    samples = draw(st.integers(0, 3))
    raw = 56 + 8 * samples + draw(st.sampled_from([0, 0, 0, 1, 2 * _R, -1]))
    zstd = draw(st.booleans())
    least_stored = -(-raw // _R)  # the fewest stored bytes a zstd frame of raw bytes needs
    step = draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    stored = least_stored + step if zstd else raw + abs(step)
    entry = {
        "file": draw(st.sampled_from(["a", "b", "c", "d", INDEX_NAME])),
        "samples": samples,
        "raw_bytes": raw,
        "stored_bytes": stored,
        "hash": {"xxh3_64": "0123456789abcdef"},
    }
    if zstd or draw(st.booleans()):
        entry["compression"] = "zstd" if zstd else None
    return entry


@settings(max_examples=500, deadline=None)
@given(
    entries=st.one_of(
        st.lists(_plausible_entry(), max_size=4, unique_by=lambda entry: entry["file"]),
        st.lists(st.one_of(_plausible_entry(), _HOSTILE_ENTRY, st.just([])), max_size=4),
    )
)
def test_the_columnwise_shard_check_agrees_with_the_one_by_one_check(entries: list) -> None:
    """A large index's shards are checked as columns; that check passes exactly the lists
    the per-shard check passes, with the same result, and leaves every error to it."""
    least = min_raw_bytes([parse_column_type("str", "text")])
    try:
        expected = _each_shard(entries, least, "index.json")
    except IndexFormatError:
        expected = None
    assert _all_shards_at_once(entries, least) == expected
