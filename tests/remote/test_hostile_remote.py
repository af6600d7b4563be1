"""Faults around a remote dataset: a damaged cached copy, a damaged remote object, an upload
killed over a published dataset, a cache folder wiped under a reader, and download targets
that cannot be written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from click.testing import CliRunner
from remote_helpers import COLUMNS, sample, wait_until

from streamshards import ShardWriter, StreamingDataset
from streamshards.cli import main
from streamshards.format import ShardError, stored_hash
from streamshards.index import load_index
from streamshards.sources import RemoteSource
from streamshards.storage import open_storage
from streamshards.transfer import RemoteWriter, download, upload, verify_remote
from streamshards.verify import SETTLE_NS, check_shard, is_verified, verify_and_mark

NEW = 100_000  # sample ids of the "new version" of a dataset


def shard_gets(s3_server, url: str) -> dict[str, int]:
    prefix = "/" + url.removeprefix("s3://") + "/"
    return {p.removeprefix(prefix): n for p, n in s3_server.gets(prefix).items()}


def write_version(folder: Path, first_id: int, samples: int = 400, shard_bytes: int = 16_000):
    """A dataset of samples first_id.., with the same shard names as any other version."""
    with ShardWriter(folder, COLUMNS, size_limit=shard_bytes) as writer:
        for i in range(first_id, first_id + samples):
            writer.write(sample(i))
    return folder


def ids_read(remote: str, local: Path) -> list[int]:
    """Every sample id of one epoch read through the node cache, checking the tokens too."""
    ds = StreamingDataset(remote=remote, local=local, prefetch=0, batch_size=16)
    ids = []
    for batch in ds.iter_batches():
        for i, tokens in zip(batch["id"], batch["tokens"], strict=True):
            assert np.array_equal(np.asarray(tokens), sample(int(i))["tokens"])
            ids.append(int(i))
    for source in ds.sources:
        source.close()  # the run ends: the next reader fetches the index again
    return ids


def problems(url: str) -> list[str]:
    _, results = verify_remote(url, workers=4)
    return [f"{info.file}: {problem}" for info, problem in results if problem]


def one_line_error(result) -> str:
    """The CLI failed with exit != 0 and a single line of message, never a traceback."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# -- 2: remote truth ---------------------------------------------------------------------------


def test_a_cached_shard_damaged_on_disk_is_fetched_again_once(
    s3_dataset, dataset, s3_server, tmp_path
):
    local = tmp_path / "cache"
    index = load_index(dataset)
    with RemoteSource(s3_dataset, local, prefetch=0) as source:
        for k in range(len(index.shards)):
            source.path(k)
            source.release(k)
    info = index.shards[2]
    assert all(is_verified(local / s.file, s) for s in index.shards)
    data = bytearray((local / info.file).read_bytes())
    data[100] ^= 0xFF
    (local / info.file).write_bytes(bytes(data))
    assert not is_verified(local / info.file, info)

    assert sorted(ids_read(s3_dataset, local)) == list(range(index.num_samples))  # a new run
    assert (local / info.file).read_bytes() == (dataset / info.file).read_bytes()
    gets = shard_gets(s3_server, s3_dataset)
    assert gets[info.file] == 2 and all(gets[s.file] == 1 for s in index.shards if s != info)
    ids_read(s3_dataset, local)  # the stamp holds: nothing is fetched again
    assert shard_gets(s3_server, s3_dataset) == {**gets, "index.json": gets["index.json"] + 1}


def test_verify_of_a_url_checks_the_remote_objects_not_the_cache(
    s3_dataset, dataset, s3_bucket, tmp_path, monkeypatch
):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where a URL's cache would go
    runner = CliRunner()
    index = load_index(dataset)
    with RemoteSource(s3_dataset, prefetch=0) as source:  # a node cache of good copies
        for k in range(len(index.shards)):
            source.path(k)
            source.release(k)
    flipped, short, long, gone = (index.shards[k] for k in (1, 3, 4, 6))
    s3 = boto3.client("s3")
    key = s3_dataset.removeprefix(f"s3://{s3_bucket}/")
    body = bytearray((dataset / flipped.file).read_bytes())
    body[-5] ^= 1
    s3.put_object(Bucket=s3_bucket, Key=f"{key}/{flipped.file}", Body=bytes(body))
    s3.put_object(Bucket=s3_bucket, Key=f"{key}/{short.file}", Body=b"x" * 100)
    s3.put_object(Bucket=s3_bucket, Key=f"{key}/{long.file}", Body=b"x" * (long.stored_bytes + 1))
    s3.delete_object(Bucket=s3_bucket, Key=f"{key}/{gone.file}")

    result = runner.invoke(main, ["verify", s3_dataset])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    bad = {line.split(":")[0] for line in lines[:-1]}
    assert bad == {f"BAD {s.file}" for s in (flipped, short, long, gone)}
    shards = len(index.shards)
    assert lines[-1] == f"{shards - 4} of {shards} shards ok, {index.num_samples:,} samples"
    text = dict(line.split(": ", 1) for line in lines[:-1])
    assert flipped.hash in text[f"BAD {flipped.file}"] and "xxh3_64=" in text[f"BAD {short.file}"]
    assert "not hashed" in text[f"BAD {long.file}"] and "not found" in text[f"BAD {gone.file}"]

    result = runner.invoke(main, ["verify", f"s3://{s3_bucket}/no-dataset"])
    assert "no-dataset/index.json: not found" in one_line_error(result)


def test_verify_of_a_url_ignores_a_damaged_cache(s3_dataset, dataset, tmp_path, monkeypatch):
    """The remote is the truth: a broken node cache does not make verify fail."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with RemoteSource(s3_dataset, prefetch=0) as source:
        path = source.path(0)
        source.release(0)
    path.write_bytes(b"broken")
    result = CliRunner().invoke(main, ["verify", s3_dataset])
    shards = len(load_index(dataset).shards)
    assert result.exit_code == 0 and f"{shards} of {shards} shards ok" in result.output


def test_verify_of_a_gcs_url_streams_the_objects(gcs_dataset, dataset, gcs_bucket):
    from google.cloud import storage

    assert problems(gcs_dataset) == []
    info = load_index(dataset).shards[0]
    blob = storage.Client().bucket(gcs_bucket).blob(f"data/v1/{info.file}")
    blob.upload_from_string(b"y" * info.stored_bytes)
    assert problems(gcs_dataset) == [
        f"{info.file}: {gcs_dataset}/{info.file} does not match the index: index says "
        f"{info.stored_bytes} bytes with xxh3_64={info.hash}, file has {info.stored_bytes} "
        f"bytes (xxh3_64={stored_hash(b'y' * info.stored_bytes)})"
    ]


def test_one_shard_check_refuses_what_is_not_the_shard_without_hanging(dataset, tmp_path):
    info = load_index(dataset).shards[0]
    copy = tmp_path / info.file
    shutil.copy(dataset / info.file, copy)
    verify_and_mark(copy, info)
    assert not is_verified(copy, info)  # just written: a write in the same clock tick could follow
    settled = time.time_ns() - 2 * SETTLE_NS
    os.utime(copy, ns=(settled, settled))
    verify_and_mark(copy, info)
    assert is_verified(copy, info)
    data = bytearray(copy.read_bytes())
    data[7] ^= 1
    copy.write_bytes(bytes(data))  # same size; the write moves mtime and voids the stamp
    assert not is_verified(copy, info)
    with pytest.raises(ShardError, match=f"shard {info.file}: .*xxh3_64={info.hash}"):
        check_shard(copy, info)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    for path in (fifo, tmp_path / "folder", tmp_path / "missing"):
        with pytest.raises(ShardError, match=f"shard {info.file}: .*{path.name}"):
            check_shard(path, info)
        assert not is_verified(path, info)


# -- 3: upload over a published dataset ----------------------------------------------------------

UPLOAD = "import sys; from streamshards.transfer import upload; upload(*sys.argv[1:3], workers=1)"


def test_an_upload_killed_over_a_dataset_leaves_the_old_one_whole(s3_bucket, s3_server, tmp_path):
    url = f"s3://{s3_bucket}/data"
    old = write_version(tmp_path / "old", 0)
    new = write_version(tmp_path / "new", NEW)
    names = [s.file for s in load_index(new).shards]
    assert names == [s.file for s in load_index(old).shards] and len(names) > 20
    upload(old, url, progress=False)

    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # what a reader sees, checked again and again meanwhile
        while not stop.is_set():
            seen.extend(problems(url))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        start = len(s3_server.requests)
        child = subprocess.Popen([sys.executable, "-c", UPLOAD, str(new), url])
        deadline = time.monotonic() + 30
        # Two PUTs have arrived: with one upload thread, the first shard is complete.
        while sum(m == "PUT" for m, _ in s3_server.requests[start:]) < 2:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        child.wait()
        put = [p for m, p in s3_server.requests[start:] if m == "PUT"]
        assert 0 < len(put) < len(names) and not any(p.endswith("index.json") for p in put)

        assert open_storage(url).get_bytes("index.json") == (old / "index.json").read_bytes()
        assert problems(url) == []
        assert sorted(ids_read(url, tmp_path / "cache")) == list(range(400))

        up = [o.name for o in open_storage(url).list() if o.name not in names]
        report = upload(new, url, progress=False)  # the rerun resumes
        assert report.skipped == len(up) - 1  # what was up before the kill, not the index
    finally:
        stop.set()
        watcher.join()
    assert seen == []
    assert problems(url) == []
    assert sorted(ids_read(url, tmp_path / "cache")) == list(range(NEW, NEW + 400))
    download(url, tmp_path / "copy", progress=False)
    assert load_index(tmp_path / "copy").num_samples == 400


def test_a_remote_writer_over_a_dataset_never_changes_the_published_one(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/data"
    old = write_version(tmp_path / "old", 0)
    names = [s.file for s in load_index(old).shards]
    upload(old, url, progress=False)
    with RemoteWriter(url, COLUMNS, overwrite=True, size_limit=16_000) as writer:
        for i in range(NEW, NEW + 400):
            writer.write(sample(i))
        wait_until(lambda: len(open_storage(url).list()) > len(names) + 3)
        assert problems(url) == []  # shards of the new version are up; the old index holds
        assert sorted(ids_read(url, tmp_path / "cache1")) == list(range(400))
    assert problems(url) == []
    assert sorted(ids_read(url, tmp_path / "cache2")) == list(range(NEW, NEW + 400))


# -- 12: the cache folder deleted under a running reader ------------------------------------------


@pytest.mark.parametrize("limit", [None, 10**9])
def test_a_cache_folder_deleted_under_a_reader_is_made_again(limit, s3_dataset, dataset, tmp_path):
    index = load_index(dataset)
    local = tmp_path / "cache"
    ds = StreamingDataset(
        remote=s3_dataset, local=local, cache_limit=limit, prefetch=2, batch_size=16
    )
    ids = []
    for n, batch in enumerate(ds.iter_batches()):
        ids += [int(i) for i in batch["id"]]
        if n in (5, 30):
            shutil.rmtree(local, ignore_errors=True)  # prefetch threads race it, as with rm -rf
    assert sorted(ids) == list(range(index.num_samples))
    ds.sources[0].close()
    assert sorted(ids_read(s3_dataset, local)) == list(range(index.num_samples))


def test_download_over_an_older_copy_never_leaves_its_index_over_new_bytes(s3_bucket, tmp_path):
    old = write_version(tmp_path / "old", 0)
    new = write_version(tmp_path / "new", NEW)
    upload(old, f"s3://{s3_bucket}/old", progress=False)
    upload(new, f"s3://{s3_bucket}/new", progress=False)
    broken = load_index(new).shards[-1]
    open_storage(f"s3://{s3_bucket}/new").put_bytes(b"z" * broken.stored_bytes, broken.file)
    target = tmp_path / "copy"
    download(f"s3://{s3_bucket}/old", target, progress=False)
    with pytest.raises(ShardError, match=broken.file):
        download(f"s3://{s3_bucket}/new", target, progress=False, workers=1)
    assert not (target / "index.json").exists()  # the old index went before any shard changed


# -- 11: download targets that cannot be written -------------------------------------------------


def test_download_into_a_file_fails_with_one_line(s3_dataset, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    line = one_line_error(CliRunner().invoke(main, ["download", s3_dataset, str(target)]))
    assert str(target) in line


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 200 KB tmpfs (the test dataset is 8 shards of about 64 KB)."""
    point = tmp_path / "mnt"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(point)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=True)


def test_download_into_a_read_only_folder_fails_with_one_line(s3_dataset, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    target = small_tmpfs / "copy"
    line = one_line_error(CliRunner().invoke(main, ["download", s3_dataset, str(target)]))
    assert "Read-only file system" in line and str(target) in line


def test_download_onto_a_full_disk_fails_with_one_line_and_resumes(
    s3_dataset, dataset, small_tmpfs
):
    target = small_tmpfs / "copy"
    args = ["download", s3_dataset, str(target), "--quiet", "--workers", "2"]
    line = one_line_error(CliRunner().invoke(main, args))
    assert "No space left on device" in line and str(target) in line
    assert not (target / "index.json").exists()
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_tmpfs)], check=True)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ["index.json", *(s.file for s in load_index(dataset).shards)]:
        assert (target / name).read_bytes() == (dataset / name).read_bytes()
    assert os.path.getsize(target / "index.json") > 0
