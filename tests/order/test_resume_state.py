"""O3 and state safety in-process: resume reads nothing before its point; bad states refused."""

from __future__ import annotations

import numpy as np
import pytest

from streamshards import StreamingDataLoader, StreamingDataset
from streamshards.format import ShardError


def _ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["id"]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_reads_no_shard_before_its_point(tmp_path, make_dataset, shuffle):
    """Delete every shard the rest of the epoch does not need: resuming still works."""
    data = make_dataset(tmp_path / "d", 0, 600, size_limit="300B")
    options = dict(shuffle=shuffle, seed=5, batch_size=10, num_partitions=4, shuffle_window=32)
    full = _ids(StreamingDataLoader(StreamingDataset(local=data, **options)))
    dataset = StreamingDataset(local=data, **options)
    loader = StreamingDataLoader(dataset)
    state = dataset.state_dict(540)
    loader.load_state_dict(state)
    _, needed, _ = dataset.order(0).locate(np.arange(540, 600))
    removed = 0
    for k, info in enumerate(dataset.sources[0].index.shards):
        if k not in set(needed.tolist()):
            (data / info.file).unlink()
            removed += 1
    assert removed > len(dataset.sources[0].index.shards) // 2
    assert _ids(loader) == full[540:]
    with pytest.raises(ShardError, match="missing"):
        dataset[0 if 0 not in needed else 599]


def test_mismatched_states_are_refused(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "d", 0, 100)
    other = make_dataset(tmp_path / "e", 0, 101)
    dataset = StreamingDataset(local=data, shuffle=True, seed=1, batch_size=4)
    state = dataset.state_dict(40)
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        StreamingDataset(local=data, shuffle=True, seed=2, batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle_window"):
        StreamingDataset(local=data, shuffle=True, seed=1, shuffle_window=9).load_state_dict(state)
    with pytest.raises(ValueError, match="different data"):
        mismatched = StreamingDataset(local=other, shuffle=True, seed=1, batch_size=4)
        mismatched.take = dataset.take
        mismatched.load_state_dict({**state, "order": mismatched.order_config()})
    with pytest.raises(ValueError, match="version"):
        dataset.load_state_dict({**state, "version": 99})
    bigger_batch = StreamingDataset(local=data, shuffle=True, seed=1, batch_size=8)
    bigger_batch.load_state_dict(state)
    assert (bigger_batch.epoch, bigger_batch.samples_seen) == (0, 40)


def test_state_is_small_plain_values(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "d", 0, 50)
    loader = StreamingDataLoader(StreamingDataset(local=data, shuffle=True, batch_size=4))
    for step, _ in enumerate(loader):
        if step == 3:
            break
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["samples_seen"] == 16
    allowed = (int, str, bool, list, dict)
    assert all(isinstance(v, allowed) for v in state.values())
    for _ in loader:
        pass
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["samples_seen"] == 0


def test_random_access_matches_iteration(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "d", 0, 77)
    dataset = StreamingDataset(local=data)
    assert len(dataset) == 77
    assert [s["id"] for s in dataset] == list(range(77))
    assert [dataset[i]["id"] for i in (0, 76, 33)] == [0, 76, 33]
    with pytest.raises(IndexError):
        dataset[77]


def test_len_counts_the_batches_left(tmp_path, make_dataset, monkeypatch):
    data = make_dataset(tmp_path / "d", 0, 103)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = StreamingDataLoader(StreamingDataset(local=data, shuffle=True, batch_size=5))
    assert len(loader) == 11  # 103 samples, 10 per global batch: 10 whole and 3 more
    batches = iter(loader)
    for _ in range(4):
        next(batches)
    assert len(loader) == 7
    assert sum(1 for _ in batches) == 7
