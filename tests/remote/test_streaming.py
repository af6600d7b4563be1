"""End to end: StreamingDataset(remote=...) streams S3 and GCS datasets through the node cache,
every sample exactly once per epoch and equal to what was written."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CacheMonitor, sample

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
