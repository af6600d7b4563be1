"""Converting MDS and LitData datasets: the native copy holds the same samples in order."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from click.testing import CliRunner
from interop_helpers import FIXTURES, NAMES, comparable, expected, expected_samples, options

from streamshards import StreamingDataset
from streamshards.cli import main
from streamshards.interop.convert import convert_foreign

CONVERTIBLE = [n for n in NAMES if n != "mds_types"]


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_convert_then_read_gives_equal_samples(tmp_path, name):
    result = convert_foreign(str(FIXTURES / name / "data"), tmp_path / "out", **options(name))
    ds = StreamingDataset(local=str(tmp_path / "out"))
    assert len(ds) == result.samples == expected(name)["num_samples"]
    assert [comparable(name, ds[i]) for i in range(len(ds))] == expected_samples(name)
    assert [comparable(name, s) for s in ds] == expected_samples(name)
    source = ds.sources[0]
    assert source.foreign is None
    provenance = source.index.provenance["converted_from"]
    assert provenance["format"] == expected(name)["format"]
    index_bytes = (FIXTURES / name / "data" / "index.json").read_bytes()
    assert provenance["index_xxh3_64"] == xxhash.xxh3_64_hexdigest(index_bytes)


@pytest.mark.parametrize("name", ["mds_tokens_int32", "mds_tokens_bytes_int64", "litdata_tokens"])
def test_token_rows_are_narrowed_to_uint16(tmp_path, name):
    result = convert_foreign(str(FIXTURES / name / "data"), tmp_path / "out", **options(name))
    (column,) = result.columns.values()
    assert column.startswith("ndarray:uint16:")
    batch = next(StreamingDataset(local=str(tmp_path / "out"), batch_size=4).iter_batches())
    assert batch["tokens"].dtype == np.uint16 and batch["tokens"].ndim == 2


def test_ids_past_uint16_are_kept_as_uint32(fixture_copy, tmp_path):
    """One id raised to 70000 (in a copy of the unhashed legacy fixture) forces uint32."""
    folder = fixture_copy("mds_tokens_bytes_int64")
    shard = folder / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    last = len(data) - 8  # the last int64 id of the last sample
    (before,) = struct.unpack_from("<q", data, last)
    struct.pack_into("<q", data, last, 70000)
    shard.write_bytes(bytes(data))
    result = convert_foreign(str(folder), tmp_path / "out")
    assert result.columns["tokens"] == "ndarray:uint32:129"
    ds = StreamingDataset(local=str(tmp_path / "out"))
    rows = expected("mds_tokens_bytes_int64")["samples"]
    assert rows[-1]["tokens"][-1] == before
    assert ds[len(ds) - 1]["tokens"].tolist() == rows[-1]["tokens"][:-1] + [70000]
    assert ds[0]["tokens"].tolist() == rows[0]["tokens"]


def test_arrays_of_several_dtypes_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"column 'dyn' holds arrays of several dtypes"):
        convert_foreign(str(FIXTURES / "mds_types" / "data"), tmp_path / "out")


def test_convert_command(tmp_path):
    runner = CliRunner()
    source = str(FIXTURES / "litdata_tokens" / "data")
    out = str(tmp_path / "out")
    result = runner.invoke(main, ["convert", source, out, "--block-size", "65"])
    assert result.exit_code == 0, result.output
    assert "converted litdata dataset" in result.output and "MB/s" in result.output
    assert len(StreamingDataset(local=out)) == expected("litdata_tokens")["num_samples"]
    refused = runner.invoke(main, ["convert", str(FIXTURES / "mds_pkl" / "data"), out + "2"])
    assert refused.exit_code == 1 and "--pkl-as-bytes" in refused.output
