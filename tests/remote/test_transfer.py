"""S6: upload is parallel, skips what is already there, publishes index.json last; download
and the CLI (upload, download, inspect, verify) work on remote URLs."""

from __future__ import annotations

import json

import boto3
import pytest
from click.testing import CliRunner
from remote_helpers import COLUMNS, sample, wait_until

from streamshards.cli import main
from streamshards.format import ShardError
from streamshards.index import load_index
from streamshards.storage import open_storage
from streamshards.transfer import RemoteWriter, download, upload


def puts(s3_server, bucket: str) -> list[str]:
    """Object keys PUT into ``bucket``, in the order the server received them."""
    prefix = f"/{bucket}/"
    return [
        p.removeprefix(prefix)
        for m, p in s3_server.requests
        if m == "PUT" and p.startswith(prefix) and p != prefix
    ]


def same_dataset(a, b) -> bool:
    index = load_index(a)
    return (a / "index.json").read_bytes() == (b / "index.json").read_bytes() and all(
        (a / s.file).read_bytes() == (b / s.file).read_bytes() for s in index.shards
    )


def test_upload_publishes_the_index_last_and_download_gives_the_same_bytes(
    dataset, s3_bucket, s3_server, tmp_path
):
    report = upload(dataset, f"s3://{s3_bucket}/v1", workers=4, progress=False)
    index = load_index(dataset)
    assert (report.files, report.skipped, report.bytes) == (
        len(index.shards),
        0,
        index.stored_bytes,
    )
    sent = puts(s3_server, s3_bucket)
    assert sent[-1] == "v1/index.json" and sorted(sent[:-1]) == [
        f"v1/{s.file}" for s in index.shards
    ]
    back = download(f"s3://{s3_bucket}/v1", tmp_path / "copy", progress=False)
    assert back.files == len(index.shards) and same_dataset(dataset, tmp_path / "copy")
    assert download(f"s3://{s3_bucket}/v1", tmp_path / "copy", progress=False).files == 0


def test_upload_skips_files_whose_size_and_hash_match(dataset, s3_bucket, s3_server):
    """Re-running an upload sends only what is missing or different, then the index."""
    url = f"s3://{s3_bucket}/v1"
    index = load_index(dataset)
    upload(dataset, url, progress=False)
    storage = open_storage(url)
    storage.delete(index.shards[3].file)
    storage.put_bytes(b"stale bytes", index.shards[5].file)
    storage.delete("index.json")  # so the skip must come from the object metadata
    before = len(puts(s3_server, s3_bucket))
    report = upload(dataset, url, progress=False)
    assert (report.files, report.skipped) == (2, len(index.shards) - 2)
    assert sorted(puts(s3_server, s3_bucket)[before:]) == sorted(
        [f"v1/{index.shards[3].file}", f"v1/{index.shards[5].file}", "v1/index.json"]
    )


def test_upload_refuses_a_local_shard_that_does_not_match_its_index(
    dataset, tmp_path, s3_bucket, s3_server
):
    broken = tmp_path / "broken"
    download(f"file://{dataset}", broken, progress=False)
    info = load_index(broken).shards[1]
    data = bytearray((broken / info.file).read_bytes())
    data[10] ^= 1
    (broken / info.file).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{info.file}.*xxh3_64={info.hash}"):
        upload(broken, f"s3://{s3_bucket}/v1", progress=False)
    assert "v1/index.json" not in puts(s3_server, s3_bucket)


@pytest.mark.parametrize("kind", ["gcs", "local"])
def test_upload_and_download_on_other_backends(kind, dataset, tmp_path, request):
    remote = (
        f"gs://{request.getfixturevalue('gcs_bucket')}/v1"
        if kind == "gcs"
        else str(tmp_path / "published")
    )
    upload(dataset, remote, progress=False)
    assert upload(dataset, remote, progress=False).files == 0
    download(remote, tmp_path / "copy", progress=False)
    assert same_dataset(dataset, tmp_path / "copy")


def test_remote_writer_uploads_shards_as_they_finish_and_the_index_last(
    s3_bucket, s3_server, tmp_path
):
    url = f"s3://{s3_bucket}/written"
    staging = tmp_path / "staging"
    with RemoteWriter(url, COLUMNS, staging=staging, size_limit=40_000) as writer:
        for i in range(300):
            writer.write(sample(i))
        wait_until(lambda: len(puts(s3_server, s3_bucket)) >= 3)
        assert "written/index.json" not in puts(s3_server, s3_bucket)
    assert puts(s3_server, s3_bucket)[-1] == "written/index.json"
    assert sorted(p.name for p in staging.iterdir()) == ["index.json"]
    download(url, tmp_path / "copy", progress=False)
    index = load_index(tmp_path / "copy")
    assert index.num_samples == 300 and len(index.shards) >= 4


def test_remote_writer_publishes_no_index_when_writing_fails(s3_bucket, s3_server, tmp_path):
    url = f"s3://{s3_bucket}/failed"
    with pytest.raises(RuntimeError, match="source broke"):
        with RemoteWriter(url, COLUMNS, size_limit=40_000) as writer:
            for i in range(200):
                writer.write(sample(i))
            raise RuntimeError("source broke")
    assert not open_storage(url).exists("index.json")
    RemoteWriter(f"s3://{s3_bucket}/done", COLUMNS).close()
    with pytest.raises(FileExistsError, match="index.json exists"):
        RemoteWriter(f"s3://{s3_bucket}/done", COLUMNS)


def test_cli_upload_download_inspect_verify_on_remote_urls(
    dataset, s3_bucket, tmp_path, monkeypatch
):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where inspect/verify cache
    url = f"s3://{s3_bucket}/cli"
    runner = CliRunner()
    result = runner.invoke(main, ["upload", str(dataset), url, "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"uploaded {len(load_index(dataset).shards)} shards" in result.output
    result = runner.invoke(main, ["inspect", url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["samples"] == load_index(dataset).num_samples
    result = runner.invoke(main, ["verify", url])
    assert result.exit_code == 0 and "shards ok" in result.output
    result = runner.invoke(main, ["download", url, str(tmp_path / "copy"), "--quiet"])
    assert result.exit_code == 0 and same_dataset(dataset, tmp_path / "copy")
    result = runner.invoke(main, ["download", f"s3://{s3_bucket}/nothing-here", str(tmp_path)])
    assert result.exit_code == 1
    assert f"s3://{s3_bucket}/nothing-here/index.json: not found" in result.output


def test_cli_verify_reports_a_corrupt_remote_shard(dataset, s3_bucket, tmp_path, monkeypatch):
    url = f"s3://{s3_bucket}/bad"
    upload(dataset, url, progress=False)
    info = load_index(dataset).shards[0]
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key=f"bad/{info.file}", Body=b"x" * info.stored_bytes
    )
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = CliRunner().invoke(main, ["verify", url])
    assert result.exit_code == 1
    assert f"BAD {info.file}" in result.output and info.hash in result.output
