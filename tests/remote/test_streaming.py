"""End to end: StreamingDataset(remote=...) streams S3 and GCS datasets through the node cache,
every sample exactly once per epoch and equal to what was written."""

from __future__ import annotations

import numpy as np
import pytest
from remote_helpers import CacheMonitor, cache_snapshot, sample

from streamshards import StreamingDataLoader, StreamingDataset
from streamshards.index import load_index


def check_epoch(batches: list[dict], expected_ids: set[int]) -> None:
    ids = [int(i) for batch in batches for i in batch["id"]]
    assert sorted(ids) == sorted(expected_ids)
    for batch in batches:
        for i, tokens in zip(batch["id"], batch["tokens"], strict=True):
            assert np.array_equal(np.asarray(tokens), sample(int(i))["tokens"])


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_two_ranks_stream_a_remote_dataset_under_a_cache_limit(
    kind, request, dataset, tmp_path, monkeypatch
):
    remote = request.getfixturevalue(f"{kind}_dataset")
    index = load_index(dataset)
    limit = 4 * max(s.stored_bytes for s in index.shards)
    names = {s.file for s in index.shards}
    local = tmp_path / "cache"
    (local / ".locks").mkdir(parents=True)
    monitor = CacheMonitor(local, names, limit)
    seen: list[dict] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        ds = StreamingDataset(
            remote=remote,
            local=local,
            cache_limit=limit,
            prefetch=2,
            shuffle=True,
            seed=7,
            batch_size=8,
            num_partitions=4,
            shuffle_window=64,
        )
        seen += list(StreamingDataLoader(ds, num_workers=2))
    monitor.stop()
    check_epoch(seen, set(range(index.num_samples)))
    assert monitor.samples > 10 and monitor.worst <= 0


def test_a_reader_holds_few_shards_and_none_after_its_epoch(s3_dataset, dataset, tmp_path):
    """Under a limit of 2 shards a dataset keeps at most 2 open; when the epoch ends (or the
    loop is abandoned) it holds none, so the cache is trimmed back within its limit."""
    index = load_index(dataset)
    names = {s.file for s in index.shards}
    limit = 2 * max(s.stored_bytes for s in index.shards)
    ds = StreamingDataset(
        remote=s3_dataset, local=tmp_path / "cache", cache_limit=limit, prefetch=0, batch_size=8
    )
    assert ds.sources[0].max_open == 2
    batches = ds.iter_batches()
    first = [next(batches) for _ in range(30)]
    assert 1 < len(ds._views) <= 2
    batches.close()
    total, in_use = cache_snapshot(tmp_path / "cache", names)
    assert in_use == 0 and ds._views == {} and total <= limit
    again = list(ds.iter_batches())  # an abandoned epoch starts over, in the same order
    check_epoch(again, set(range(index.num_samples)))
    assert all(np.array_equal(a["id"], b["id"]) for a, b in zip(first, again[:30], strict=True))
    total, in_use = cache_snapshot(tmp_path / "cache", names)
    assert in_use == 0 and 0 < total <= limit
