"""S2: transient faults are retried with bounded jittered backoff; bad bodies are never used."""

from __future__ import annotations

import boto3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamshards.format import ShardError, stored_hash
from streamshards.index import load_index
from streamshards.sources import RemoteSource
from streamshards.storage import RetryPolicy, StorageError, TransientError

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def shard_key(url: str, name: str) -> str:
    return "/" + url.removeprefix("s3://") + "/" + name


@given(st.integers(1, 40), st.floats(0.001, 10), st.floats(0.001, 100))
def test_backoff_is_bounded_exponential_with_jitter(failures, base, cap):
    policy = RetryPolicy(attempts=50, base_delay=base, max_delay=cap)
    assert 0.0 <= policy.delay(failures) <= min(cap, base * 2 ** (failures - 1))


def test_only_transient_errors_are_retried_and_only_so_often():
    calls = []

    def flaky():
        calls.append(1)
        raise TransientError("s3://b/x: connection reset")

    with pytest.raises(TransientError, match="gave up after 4 tries"):
        FAST.call(flaky)
    assert len(calls) == 4

    def denied():
        calls.append(2)
        raise StorageError("s3://b/x: AccessDenied")

    with pytest.raises(StorageError):
        FAST.call(denied)
    assert calls.count(2) == 1


@pytest.mark.parametrize("fault", ["drop", "reset", "stall"])
def test_a_broken_download_is_retried_and_the_shard_is_whole(
    fault, s3_dataset, s3_server, s3_proxy, dataset, tmp_path
):
    index = load_index(dataset)
    source = RemoteSource(s3_dataset, tmp_path / "cache", prefetch=0, retry=FAST, timeout=1.0)
    s3_proxy.inject(fault, after_bytes=20_000, times=2, stall_seconds=2.0)
    path = source.path(0)
    assert s3_proxy.applied == [fault, fault]
    assert stored_hash(path.read_bytes()) == index.shards[0].hash
    assert s3_server.gets(shard_key(s3_dataset, index.shards[0].file)).total() == 3
    assert sorted(p.name for p in path.parent.iterdir()) == [".locks", "index.json", path.name]


def test_a_truncated_body_is_never_used(s3_dataset, s3_proxy, dataset, tmp_path):
    """When every try is cut short the read fails, and nothing is left under any name."""
    source = RemoteSource(
        s3_dataset, tmp_path / "cache", prefetch=0, retry=RetryPolicy(attempts=2, base_delay=0.01)
    )
    s3_proxy.inject("drop", after_bytes=20_000, times=2)
    with pytest.raises(TransientError, match="gave up after 2 tries"):
        source.path(0)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".locks", "index.json"]
    s3_proxy.clear()
    assert stored_hash(source.path(0).read_bytes()) == load_index(dataset).shards[0].hash


def test_a_body_corrupted_in_flight_is_fetched_again(
    s3_dataset, s3_server, s3_proxy, dataset, tmp_path
):
    index = load_index(dataset)
    source = RemoteSource(s3_dataset, tmp_path / "cache", prefetch=0, retry=FAST)
    s3_proxy.inject("corrupt", after_bytes=20_000, times=1)
    path = source.path(1)
    assert s3_proxy.applied == ["corrupt"]
    assert stored_hash(path.read_bytes()) == index.shards[1].hash
    assert s3_server.gets(shard_key(s3_dataset, index.shards[1].file)).total() == 2


def test_a_corrupt_stored_shard_fails_after_one_more_fetch_naming_both_hashes(
    s3_dataset, s3_server, dataset, tmp_path
):
    index = load_index(dataset)
    info = index.shards[2]
    bucket, prefix = s3_dataset.removeprefix("s3://").split("/", 1)
    good = (dataset / info.file).read_bytes()
    bad = good[:100] + bytes([good[100] ^ 1]) + good[101:]
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{info.file}", Body=bad)
    source = RemoteSource(s3_dataset, tmp_path / "cache", prefetch=0, retry=FAST)
    with pytest.raises(ShardError) as err:
        source.path(2)
    message = str(err.value)
    assert info.file in message and info.hash in message and stored_hash(bad) in message
    assert s3_server.gets(shard_key(s3_dataset, info.file)).total() == 2
    assert not (tmp_path / "cache" / info.file).exists()
