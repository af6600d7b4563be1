"""Compressed shards opened on threads ahead of the in-process reader (streamshards.ahead):
the same samples, errors met where the reader meets them, bounded memory, and nothing
carried into a forked loader worker."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from core_helpers import text_samples, write_dataset

from streamshards import StreamingDataLoader, StreamingDataset
from streamshards.ahead import OpenAhead
from streamshards.format import ShardError
from streamshards.sources.local import LocalSource

COLUMNS = {"id": "int64", "text": "str"}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """A zstd dataset of about a dozen shards."""
    return write_dataset(tmp_path / "ds", COLUMNS, text_samples(600), size_limit=4096)


class RecordingSource(LocalSource):
    """A real local source that records which thread opened each shard."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.opened_on: dict[int, str] = {}

    def open_view(self, shard: int):
        self.opened_on[shard] = threading.current_thread().name
        return super().open_view(shard)


def test_hinted_shards_are_opened_on_threads_and_read_back_the_same(folder: Path) -> None:
    source = RecordingSource(folder)
    shards = source.index.shards
    assert len(shards) >= 8 and all(info.compression == "zstd" for info in shards)
    ahead = OpenAhead([source], threads=2, max_bytes=1 << 30)
    ahead.want([((0, s), info.raw_bytes) for s, info in enumerate(shards)])
    plain = LocalSource(folder)
    for s in range(len(shards)):
        view = ahead.take((0, s))
        assert view is not None, f"shard {s} was hinted but not opened ahead"
        expected = plain.open_view(s)
        assert [view.sample(j) for j in range(shards[s].samples)] == [
            expected.sample(j) for j in range(shards[s].samples)
        ]
    assert all(name.startswith("streamshards") for name in source.opened_on.values())
    assert ahead.take((0, 0)) is None  # handed over once; a second open is the caller's


def test_views_held_ahead_stay_within_the_byte_limit(folder: Path) -> None:
    source = LocalSource(folder)
    shards = source.index.shards
    largest = max(info.raw_bytes for info in shards)
    ahead = OpenAhead([source], threads=2, max_bytes=largest)  # room for one view at a time
    ahead.want([((0, s), info.raw_bytes) for s, info in enumerate(shards)])
    for s in range(len(shards)):
        assert ahead._held <= largest and len(ahead._pending) <= 1
        assert ahead.take((0, s)) is not None


def test_a_damaged_shard_opened_ahead_is_named_when_the_reader_reaches_it(folder: Path) -> None:
    source = LocalSource(folder)
    bad = 3
    path = source.path(bad)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ahead = OpenAhead([source], threads=2, max_bytes=1 << 30)
    ahead.want([((0, s), info.raw_bytes) for s, info in enumerate(source.index.shards)])
    for s in range(bad):
        assert ahead.take((0, s)) is not None
    with pytest.raises(ShardError, match=source.index.shards[bad].file):
        ahead.take((0, bad))
    with pytest.raises(ShardError, match=source.index.shards[bad].file):
        list(StreamingDataset(local=folder))


@pytest.mark.parametrize("shuffle", [False, True])
def test_in_process_reading_with_threads_equals_reading_without(
    folder: Path, shuffle: bool
) -> None:
    with_threads = StreamingDataset(local=folder, shuffle=shuffle, seed=5, batch_size=4)
    without = StreamingDataset(local=folder, shuffle=shuffle, seed=5, batch_size=4)
    without._ahead = OpenAhead(without.sources, threads=0, max_bytes=0)
    got = [s["id"] for s in with_threads]
    assert got == [s["id"] for s in without]
    assert sorted(got) == list(range(600))
    assert with_threads._ahead is not None and with_threads._ahead._pool is not None


def test_a_loader_forked_while_shards_are_opened_ahead_reads_the_same_epoch(
    folder: Path,
) -> None:
    """Workers forked with the parent's threads mid-work start without them, and neither
    hang nor change the batches."""
    reference = [s["id"] for s in StreamingDataset(local=folder, shuffle=True, seed=9)]
    ds = StreamingDataset(local=folder, shuffle=True, seed=9, batch_size=1)
    ahead = ds._opener()
    ahead.want([((0, s), info.raw_bytes) for s, info in enumerate(ds.sources[0].index.shards)])
    assert ahead._pending  # threads are opening shards as the workers fork
    loader = StreamingDataLoader(ds, num_workers=2)
    ids = [int(i) for batch in loader for i in batch["id"]]
    assert ids == reference
    assert [s["id"] for s in ds] == reference  # and the parent still reads with its threads


def test_a_forked_child_does_not_wait_on_the_parents_threads(folder: Path) -> None:
    source = LocalSource(folder)
    ahead = OpenAhead([source], threads=2, max_bytes=1 << 30)
    ahead.want([((0, s), info.raw_bytes) for s, info in enumerate(source.index.shards)])
    pid = os.fork()
    if pid == 0:  # the child: nothing opened ahead is its, so the reader opens shard 1 itself
        os._exit(0 if ahead.take((0, 1)) is None and not ahead._pending else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ahead.take((0, 1)) is not None
