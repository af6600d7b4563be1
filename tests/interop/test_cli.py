"""``streamshards inspect`` and ``verify`` on MDS and LitData folders."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from interop_helpers import FIXTURES, NAMES, expected, options

from streamshards.cli import main


def flags(name: str) -> list[str]:
    opts = options(name)
    if "block_size" in opts:
        return ["--block-size", str(opts["block_size"])]
    return ["--pkl-as-bytes"] if opts else []


@pytest.mark.parametrize("name", NAMES)
def test_inspect_and_verify_every_fixture(name):
    folder = str(FIXTURES / name / "data")
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", folder, "--json", *flags(name)])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["samples"] == expected(name)["num_samples"]
    assert summary["provenance"]["format"] == expected(name)["format"]
    checked = runner.invoke(main, ["verify", folder, *flags(name)])
    assert checked.exit_code == 0, checked.output
    assert "shards ok" in checked.output


def test_verify_names_the_damaged_shard(fixture_copy):
    folder = fixture_copy("mds_merged")
    shard = folder / "0" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 1
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1
    assert "BAD 0/shard.00001.mds: shard 0/shard.00001.mds: hash mismatch" in result.output
    assert "5 of 6 shards ok" in result.output


def test_inspect_asks_for_a_block_size():
    result = CliRunner().invoke(main, ["inspect", str(FIXTURES / "litdata_tokens" / "data")])
    assert result.exit_code == 1 and "block_size" in result.output
