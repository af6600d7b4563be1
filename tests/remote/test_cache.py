"""S3-S5: one download per node, a cache limit that never evicts under a reader, prefetch,
and nothing left behind by a killed process. Several tests use real (forked) processes."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pickle
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from remote_helpers import CacheMonitor, cache_snapshot, sample, wait_until, write_dataset

from streamshards.format import stored_hash
from streamshards.index import load_index
from streamshards.reader import open_shard
from streamshards.sources import RemoteSource
from streamshards.storage import NotFoundError, RetryPolicy
from streamshards.storage.flock import flocked
from streamshards.transfer import upload

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
FORK = multiprocessing.get_context("fork")


def index_path(url: str) -> str:
    return "/" + url.removeprefix("s3://") + "/index.json"


def shard_gets(s3_server, url: str) -> dict[str, int]:
    prefix = "/" + url.removeprefix("s3://") + "/"
    return {
        p.removeprefix(prefix): n
        for p, n in s3_server.gets(prefix).items()
        if not p.endswith("index.json")
    }


def check_samples(path: Path, dataset: Path, shard: int) -> None:
    """Every sample of the cached shard equals the one written, and the file is the local copy."""
    index = load_index(dataset)
    info = index.shards[shard]
    assert path.read_bytes() == (dataset / info.file).read_bytes()
    view = open_shard(path, info, index)
    first = int(index.shard_starts[shard])
    for j in range(view.num_samples):
        got, want = view.sample(j), sample(first + j)
        assert got["id"] == want["id"] and got["text"] == want["text"]
        assert np.array_equal(got["tokens"], want["tokens"])


def read_in_step(
    remote: str, local: Path, limit: int, dataset: Path, passes: int, barrier, errors
) -> None:
    """One rank/worker process: read every shard in order, in lockstep with the others."""
    try:
        source = RemoteSource(remote, local, cache_limit=limit, prefetch=2, retry=FAST)
        order = list(range(len(source.index.shards)))
        for _ in range(passes):
            for i, shard in enumerate(order):
                source.prefetch(order[i + 1 : i + 3])
                check_samples(source.path(shard), dataset, shard)
                source.release(shard)
                barrier.wait(timeout=30)
        source.close()
    except BaseException as err:
        errors.put(repr(err))
        barrier.abort()
        raise


def test_two_ranks_two_workers_share_one_cache_under_a_limit(
    s3_dataset, s3_server, dataset, tmp_path
):
    """4 processes x 2 passes: each shard downloaded once per pass, the cache never over its
    limit by more than the shards in use, every sample equal to the local copy."""
    index = load_index(dataset)
    names = {s.file for s in index.shards}
    limit = 3 * max(s.stored_bytes for s in index.shards)
    local = tmp_path / "cache"
    (local / ".locks").mkdir(parents=True)
    barrier, errors = FORK.Barrier(4), FORK.Queue()
    workers = [
        FORK.Process(
            target=read_in_step, args=(s3_dataset, local, limit, dataset, 2, barrier, errors)
        )
        for _ in range(4)
    ]
    for w in workers:
        w.start()
    monitor = CacheMonitor(local, names, limit)  # after the forks: they must not inherit its lock
    for w in workers:
        w.join(60)
    monitor.stop()
    assert errors.empty(), errors.get()
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert shard_gets(s3_server, s3_dataset) == {name: 2 for name in names}
    assert s3_server.count("GET", index_path(s3_dataset)) == 1
    assert monitor.samples > 10 and monitor.worst <= 0


def test_a_shard_in_use_is_never_evicted(s3_dataset, dataset, tmp_path):
    """With room for 1.5 shards and shard 0 held throughout, every read overshoots the limit,
    only ever by shards in use: idle ones go at once, the held one never."""
    index = load_index(dataset)
    names = {s.file for s in index.shards}
    size = max(s.stored_bytes for s in index.shards)
    source = RemoteSource(
        s3_dataset, tmp_path / "cache", cache_limit=int(1.5 * size), prefetch=0, retry=FAST
    )
    held = source.path(0)
    for k in range(1, len(index.shards)):
        path = source.path(k)
        total, in_use = cache_snapshot(source.local, names)
        assert held.exists() and in_use == total  # idle shards made room, the held one stayed
        check_samples(path, dataset, k)
        source.release(k)
        total, in_use = cache_snapshot(source.local, names)
        assert total <= source.cache_limit + in_use
    check_samples(held, dataset, 0)
    source.path(1), source.path(2)
    for k in range(3):  # releasing trims: idle shards never pile up past the limit
        source.release(k)
        total, in_use = cache_snapshot(source.local, names)
        assert total <= source.cache_limit + in_use
    assert in_use == 0


def test_the_index_is_fetched_once_per_node(s3_dataset, s3_server, tmp_path):
    first = RemoteSource(s3_dataset, tmp_path / "cache")
    second = RemoteSource(s3_dataset, tmp_path / "cache")
    assert first.index.to_dict() == second.index.to_dict()
    assert s3_server.count("GET", index_path(s3_dataset)) == 1


def test_a_new_run_sees_a_changed_remote_and_drops_stale_shards(s3_dataset, dataset, tmp_path):
    """The index is shared while any process of a run is alive; the next run refetches it."""
    index = load_index(dataset)
    first = RemoteSource(s3_dataset, tmp_path / "cache", prefetch=0)
    first.path(0)
    other = write_dataset(tmp_path / "other", 100, 64_000)
    upload(other, s3_dataset, progress=False)
    second = RemoteSource(s3_dataset, tmp_path / "cache")
    assert second.index.to_dict() == index.to_dict()
    first.close()
    second.close()
    fresh = RemoteSource(s3_dataset, tmp_path / "cache", prefetch=0)
    assert fresh.index.num_samples == 100
    assert fresh.path(0).read_bytes() == (other / fresh.index.shards[0].file).read_bytes()


def test_a_failed_start_holds_no_lock(s3_bucket, dataset, tmp_path):
    local = tmp_path / "cache"
    with pytest.raises(NotFoundError, match=f"s3://{s3_bucket}/later/index.json"):
        RemoteSource(f"s3://{s3_bucket}/later", local)
    for name in ("session", "cache"):
        with flocked(local / ".locks" / name, fcntl.LOCK_EX | fcntl.LOCK_NB) as fd:
            assert fd is not None, f"{name} lock still held"
    upload(dataset, f"s3://{s3_bucket}/later", progress=False)
    assert RemoteSource(f"s3://{s3_bucket}/later", local).index.to_dict() == (
        load_index(dataset).to_dict()
    )


def test_prefetch_fetches_ahead_so_reads_do_not_download(s3_dataset, s3_server, dataset, tmp_path):
    """Hinted shards arrive in the background, at most ``prefetch`` ahead of the reads, each
    downloaded once."""
    source = RemoteSource(s3_dataset, tmp_path / "cache", prefetch=3, retry=FAST)
    n = len(source.index.shards)
    source.prefetch(list(range(n)))
    wait_until(lambda: sum(shard_gets(s3_server, s3_dataset).values()) == 3)
    time.sleep(0.1)
    assert sorted(shard_gets(s3_server, s3_dataset)) == [s.file for s in source.index.shards[:3]]
    for k in range(n):  # each shard is in the cache before it is asked for
        wait_until(lambda k=k: (source.local / source.index.shards[k].file).exists())
        check_samples(source.path(k), dataset, k)
        source.release(k)
    assert shard_gets(s3_server, s3_dataset) == {s.file: 1 for s in source.index.shards}
    source.close()


def test_wait_seconds_reports_time_spent_waiting_for_data(s3_dataset, s3_proxy, tmp_path):
    source = RemoteSource(s3_dataset, tmp_path / "cache", prefetch=2, retry=FAST)
    s3_proxy.inject("slow", after_bytes=20_000, times=1, bytes_per_second=100_000)
    source.path(0)  # about 0.5 s at 100 KB/s
    slow = source.wait_seconds()
    assert slow > 0.3
    source.prefetch([1])
    wait_until(lambda: (source.local / source.index.shards[1].file).exists())
    source.path(1)
    assert source.wait_seconds() - slow < 0.1


def download_slowly(remote: str, local: Path) -> None:
    RemoteSource(remote, local, prefetch=0).path(0)


def hold_shard(remote: str, local: Path, ready) -> None:
    RemoteSource(remote, local, prefetch=0).path(1)
    ready.set()
    time.sleep(60)


def test_a_killed_process_leaves_nothing_that_blocks_or_is_used(
    s3_dataset, s3_proxy, dataset, tmp_path
):
    """SIGKILL mid-download and while reading: the next start neither waits on a stale lock
    nor uses the partial file, and the killed reader's shard becomes evictable."""
    index = load_index(dataset)
    local = tmp_path / "cache"
    RemoteSource(s3_dataset, local)
    part = local / f".{index.shards[0].file}.part"
    s3_proxy.inject("slow", after_bytes=20_000, times=1, bytes_per_second=20_000)
    downloader = FORK.Process(target=download_slowly, args=(s3_dataset, local))
    downloader.start()
    wait_until(lambda: s3_proxy.applied == ["slow"] and part.exists())
    time.sleep(0.3)  # well inside the 3 s the body takes at this rate
    os.kill(downloader.pid, signal.SIGKILL)
    downloader.join()
    assert part.exists() and not (local / index.shards[0].file).exists()

    ready = FORK.Event()
    reader = FORK.Process(target=hold_shard, args=(s3_dataset, local, ready))
    reader.start()
    assert ready.wait(30)
    os.kill(reader.pid, signal.SIGKILL)
    reader.join()

    start = time.monotonic()
    size = max(s.stored_bytes for s in index.shards)
    source = RemoteSource(s3_dataset, local, cache_limit=2 * size, prefetch=0, retry=FAST)
    assert not part.exists()  # the stale partial download is cleaned, never renamed in
    check_samples(source.path(0), dataset, 0)
    assert time.monotonic() - start < 5
    for k in range(2, 4):
        source.path(k)
        source.release(k)
    assert not (local / index.shards[1].file).exists()  # the dead reader protects nothing


def test_a_full_size_stale_part_file_is_not_used(s3_dataset, dataset, tmp_path):
    local = tmp_path / "cache"
    source = RemoteSource(s3_dataset, local, prefetch=0)
    info = source.index.shards[0]
    (local / f".{info.file}.part").write_bytes(b"\0" * info.stored_bytes)
    assert stored_hash(source.path(0).read_bytes()) == info.hash


def test_without_a_local_folder_the_cache_is_keyed_by_url_in_the_temp_folder(
    s3_dataset, dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = RemoteSource(s3_dataset, None)
    assert source.local.parent == tmp_path / "streamshards-cache"
    check_samples(source.path(3), dataset, 3)
    assert RemoteSource(s3_dataset + "/", None).local == source.local


@pytest.mark.parametrize("scheme", ["s3", "gs", "file"])
def test_every_remote_streams_through_the_cache_and_pickles(scheme, request, dataset, tmp_path):
    fixtures = {"s3": "s3_dataset", "gs": "gcs_dataset"}
    remote = f"file://{dataset}" if scheme == "file" else request.getfixturevalue(fixtures[scheme])
    size = max(s.stored_bytes for s in load_index(dataset).shards)
    source = RemoteSource(remote, tmp_path / "cache", cache_limit=2 * size, prefetch=2)
    source = pickle.loads(pickle.dumps(source))  # as a spawned loader worker receives it
    n = len(source.index.shards)
    for k in range(n):
        source.prefetch(list(range(k + 1, n)))
        check_samples(source.path(k), dataset, k)
        source.release(k)
    source.close()
