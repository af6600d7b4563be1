"""Hostile shard files: refused at once, in bounded memory, with a ShardError naming the shard.

A FIFO, device, directory or symlink to one in a shard's place; a huge file; a zstd bomb
without a content size; offsets edited to wrap around 2**64; a second frame after the first.
Edits that keep the index consistent recompute its hash and sizes, so only the layout checks
stand between them and wrong data.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import xxhash
import zstandard
from click.testing import CliRunner
from hostile_helpers import COLUMNS, write

from streamshards import ShardWriter, StreamingDataset, load_index
from streamshards.cli import main
from streamshards.columns import parse_column_type
from streamshards.format import ShardError, build_shard
from streamshards.index import INDEX_NAME, Index, ShardInfo, write_index


def replace_shard(folder: Path, k: int, stored: bytes, raw_bytes: int | None = None) -> str:
    """Put ``stored`` in place of shard ``k``, with an index entry whose hash and sizes match
    it (raw_bytes too when given); return the shard's name."""
    obj = json.loads((folder / INDEX_NAME).read_text())
    entry = obj["shards"][k]
    (folder / entry["file"]).write_bytes(stored)
    entry.update(stored_bytes=len(stored), hash={"xxh3_64": xxhash.xxh3_64_hexdigest(stored)})
    if raw_bytes is not None:
        entry["raw_bytes"] = raw_bytes
    (folder / INDEX_NAME).write_text(json.dumps(obj))
    return entry["file"]


def refused_within_a_second(folder: Path) -> str:
    """Read every sample; return the ShardError's message, failing if it took over 1 s."""
    start = time.monotonic()
    with pytest.raises(ShardError) as err:
        ds = StreamingDataset(local=folder)
        for i in range(len(ds)):
            ds[i]
    assert time.monotonic() - start < 1.0, "refusing the shard took over a second"
    return str(err.value)


def put_non_regular(path: Path, kind: str, tmp_path: Path) -> None:
    """Replace ``path`` by a FIFO, a device, a directory or a symlink to one."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "symlink to a fifo":
        os.mkfifo(tmp_path / "fifo")
        path.symlink_to(tmp_path / "fifo")
    else:
        (tmp_path / "dir").mkdir()
        path.symlink_to(tmp_path / "dir")


KINDS = ["fifo", "directory", "symlink to /dev/zero", "symlink to a fifo", "symlink to a dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_shard_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    folder = write(tmp_path / "ds")
    info = load_index(folder).shards[0]
    put_non_regular(folder / info.file, kind, tmp_path)
    message = refused_within_a_second(folder)
    assert info.file in message and "not a regular file" in message, message

    command = shutil.which("streamshards")
    assert command, "the streamshards console script is not installed (pip install -e .)"
    result = subprocess.run(
        [command, "verify", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and bad[0].startswith(f"BAD {info.file}: "), result.stdout


def test_a_huge_file_in_a_shards_place_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A 16 GiB sparse file: the size mismatch is reported from its size alone."""
    folder = write(tmp_path / "ds")
    info = load_index(folder).shards[0]
    with open(folder / info.file, "r+b") as f:
        f.truncate(2**34)
    message = refused_within_a_second(folder)
    assert info.file in message and str(2**34) in message and str(info.stored_bytes) in message


def rle_bomb(blocks: int) -> bytes:
    """A zstd frame without a content size or checksum: ``blocks`` RLE blocks of 128 KiB."""
    header = zstandard.FRAME_HEADER + bytes([0x00, 0x38])  # no size flags; 128 KiB window
    block = (128 * 1024 << 3 | 1 << 1).to_bytes(3, "little") + b"x"
    last = (128 * 1024 << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"x"
    return header + block * (blocks - 1) + last


def test_a_frame_without_a_content_size_cannot_expand_past_raw_bytes(tmp_path: Path) -> None:
    """A 1 GiB bomb in 32 KB, indexed with the shard's true raw size: refused within a
    second, and the reader's peak memory barely grows."""
    folder = write(tmp_path / "ds")
    bomb = rle_bomb(8192)
    assert zstandard.ZstdDecompressor().stream_reader(bomb).read(1 << 20) == b"x" * (1 << 20)
    raw_bytes = load_index(folder).shards[0].raw_bytes
    name = replace_shard(folder, 0, bomb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = refused_within_a_second(folder)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert name in message and f"more than the {raw_bytes} bytes" in message, message
    assert grown_kib < 64 * 1024, f"peak memory grew {grown_kib} KiB"


TEXT = 1  # the text column's entry in the column table
WRAPS = {
    "offsets[0] = 2**64 - 8": lambda table, raw: (table[TEXT][0], 2**64 - 8),
    "offsets[1] = 2**64 - 1": lambda table, raw: (table[TEXT][0] + 8, 2**64 - 1),
    "offsets_pos = 2**64 - 8": lambda table, raw: (24 + 24 * TEXT, 2**64 - 8),
    "data_pos = 2**64 - 8": lambda table, raw: (24 + 24 * TEXT + 8, 2**64 - 8),
    "data_bytes = 2**64 - 8": lambda table, raw: (24 + 24 * TEXT + 16, 2**64 - 8),
}


@pytest.mark.parametrize("edit", list(WRAPS))
def test_offsets_edited_to_wrap_are_a_layout_error(tmp_path: Path, edit: str) -> None:
    """u64 positions edited so that 64-bit sums wrap back into the shard, hash recomputed:
    the shard is refused before any string is returned."""
    folder = write(tmp_path / "ds", compression=None)
    info = load_index(folder).shards[0]
    raw = bytearray((folder / info.file).read_bytes())
    table = [struct.unpack_from("<QQQ", raw, 24 + 24 * k) for k in range(len(COLUMNS))]
    pos, value = WRAPS[edit](table, raw)
    struct.pack_into("<Q", raw, pos, value)
    name = replace_shard(folder, 0, bytes(raw), len(raw))
    message = refused_within_a_second(folder)
    assert name in message and "column 'text'" in message, message
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and bad[0].startswith(f"BAD {name}: "), result.output


@pytest.mark.parametrize(
    "tail", [zstandard.ZstdCompressor().compress(b"more"), b"\0\0\0\0", b"\x50\x2a\x4d\x18"]
)
def test_anything_after_the_one_zstd_frame_is_refused(tmp_path: Path, tail: bytes) -> None:
    """A second frame, zeros or a skippable-frame magic after the frame: FORMAT.md allows
    exactly one frame."""
    folder = write(tmp_path / "ds")
    info = load_index(folder).shards[0]
    name = replace_shard(folder, 0, (folder / info.file).read_bytes() + tail)
    message = refused_within_a_second(folder)
    assert name in message and "exactly one frame" in message, message


def test_json_nested_too_deeply_is_a_named_error(tmp_path: Path) -> None:
    """The writer refuses a value nested past the recursion limit naming the column; a shard
    holding such JSON text is refused naming the shard, column and sample."""
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="column 'meta'"):
        with ShardWriter(tmp_path / "refused", {"meta": "json"}) as writer:
            writer.write({"meta": deep})

    raw = build_shard([(parse_column_type("json"), [b"[" * 100_000 + b"]" * 100_000])], 1)
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "deep.ssd").write_bytes(raw)
    info = ShardInfo("deep.ssd", 1, len(raw), len(raw), xxhash.xxh3_64_hexdigest(raw), None)
    write_index(folder, Index({"meta": "json"}, [info]))
    message = refused_within_a_second(folder)
    assert "deep.ssd" in message and "column 'meta' sample 0" in message, message
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("BAD deep.ssd: "), result.output
