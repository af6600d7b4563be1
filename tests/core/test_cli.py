"""`streamshards verify` and `streamshards inspect` on good and damaged datasets."""

from __future__ import annotations

import json
from pathlib import Path

import xxhash
from click.testing import CliRunner
from core_helpers import run_cli, text_samples, write_dataset

from streamshards import load_index
from streamshards.cli import main
from streamshards.index import INDEX_NAME

COLUMNS = {"id": "int64", "text": "str"}


def test_verify_names_every_bad_shard_with_both_hashes(tmp_path: Path) -> None:
    """Exit code 1 and one line per bad shard: bit-flipped, truncated, or hash-consistent but
    undecodable; the good shards are not reported."""
    folder = write_dataset(tmp_path, COLUMNS, text_samples(80), size_limit=1200, compression=None)
    shards = load_index(folder).shards
    assert len(shards) >= 5
    flipped, truncated, undecodable = shards[1], shards[3], shards[4]
    actual = {}
    for info, edit in ((flipped, "flip"), (truncated, "cut")):
        data = bytearray((folder / info.file).read_bytes())
        if edit == "flip":
            data[100] ^= 1
        else:
            del data[-1]
        (folder / info.file).write_bytes(data)
        actual[info.file] = xxhash.xxh3_64_hexdigest(bytes(data))

    data = (folder / undecodable.file).read_bytes()
    text = text_samples(80)[sum(s.samples for s in shards[:4])]["text"].encode()
    broken = data.replace(text, b"\xff" + text[1:], 1)
    assert broken != data
    (folder / undecodable.file).write_bytes(broken)
    index = json.loads((folder / INDEX_NAME).read_text())
    index["shards"][4]["hash"]["xxh3_64"] = xxhash.xxh3_64_hexdigest(broken)
    (folder / INDEX_NAME).write_text(json.dumps(index))

    result = run_cli("verify", str(folder))
    assert result.returncode == 1, result.stdout + result.stderr
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 3, result.stdout
    line = bad[0]
    assert flipped.file in line and flipped.hash in line and actual[flipped.file] in line, line
    # a size mismatch names both sizes and reads nothing to hash
    assert truncated.file in bad[1] and f"{truncated.stored_bytes - 1} bytes" in bad[1], bad[1]
    assert undecodable.file in bad[2] and "utf-8" in bad[2], bad[2]
    assert f"{len(shards) - 3} of {len(shards)} shards ok" in result.stdout


def test_verify_accepts_a_good_dataset(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, COLUMNS, text_samples(30), size_limit=800)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 0, result.output
    assert "shards ok, 30 samples" in result.output


def test_inspect_json_reports_sizes_schema_and_provenance(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    folder = write_dataset(
        tmp_path, COLUMNS, text_samples(50), size_limit=1000, provenance={"source": "unit test"}
    )
    index = load_index(folder)
    result = CliRunner().invoke(main, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["samples"] == 50
    assert summary["shards"] == len(index.shards) > 1
    assert summary["raw_bytes"] == sum(s.raw_bytes for s in index.shards)
    assert summary["stored_bytes"] == sum(s.stored_bytes for s in index.shards)
    assert summary["compression_ratio"] == round(summary["raw_bytes"] / summary["stored_bytes"], 3)
    assert summary["columns"] == COLUMNS
    assert summary["provenance"]["source"] == "unit test"
    assert summary["provenance"]["created"] == "1970-01-01T00:00:00Z"
    assert summary["provenance"]["tool"].startswith("streamshards ")


def test_inspect_and_verify_name_a_folder_without_index(tmp_path: Path) -> None:
    for command in ("inspect", "verify"):
        result = CliRunner().invoke(main, [command, str(tmp_path)])
        assert result.exit_code == 1
        assert str(tmp_path / INDEX_NAME) in result.output


def test_every_format_command_has_help_with_an_example() -> None:
    for command in ("inspect", "verify", "merge"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Example: streamshards " + command in result.output
