"""S1: one storage interface over local folders, file://, S3 and GCS, against real servers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from streamshards.format import stored_hash
from streamshards.storage import (
    HASH_METADATA_KEY,
    NotFoundError,
    PermissionDeniedError,
    RetryPolicy,
    open_storage,
)


@pytest.fixture(params=["path", "file", "s3", "gcs"])
def store_url(request, tmp_path) -> str:
    if request.param == "path":
        return str(tmp_path / "store" / "prefix")
    if request.param == "file":
        return f"file://{tmp_path}/store/prefix"
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/some/prefix"
    return f"gs://{request.getfixturevalue('gcs_bucket')}/some/prefix"


def test_round_trip_through_every_backend(store_url, tmp_path):
    """put/list/stat/get/delete behave the same on every backend; the hash rides along."""
    storage = open_storage(store_url)
    source = tmp_path / "blob.bin"
    payload = os.urandom(300_000)
    source.write_bytes(payload)
    storage.put(source, "a.bin", stored_hash(payload))
    storage.put_bytes(b'{"x": 1}', "index.json")

    assert [(o.name, o.size) for o in storage.list()] == [("a.bin", 300_000), ("index.json", 8)]
    info = storage.stat("a.bin")
    assert info.size == 300_000
    if not store_url.startswith(("/", "file://")):
        assert info.xxh3_64 == stored_hash(payload)
    assert storage.get_bytes("index.json") == b'{"x": 1}'
    dest = storage.get("a.bin", tmp_path / "copy.bin")
    assert dest.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert storage.exists("a.bin") and not storage.exists("b.bin")
    storage.delete("a.bin")
    storage.delete("a.bin")
    assert not storage.exists("a.bin")


def test_s3_big_files_go_up_as_multipart(s3_bucket, tmp_path):
    """A file over the threshold is uploaded in parts (the ETag of a 3-part upload ends -3)."""
    import boto3

    storage = open_storage(f"s3://{s3_bucket}/p")
    storage.multipart_threshold = storage.part_bytes = 5 << 20
    payload = os.urandom(11 << 20)
    (tmp_path / "big").write_bytes(payload)
    sent = []
    storage.put(tmp_path / "big", "big", stored_hash(payload), progress=sent.append)
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="p/big")
    assert head["ETag"].strip('"').endswith("-3")
    assert head["Metadata"][HASH_METADATA_KEY] == stored_hash(payload)
    assert sorted(sent) == [1 << 20, 5 << 20, 5 << 20]
    assert storage.get_bytes("big") == payload


def test_gcs_big_files_go_up_in_resumable_chunks(gcs_bucket, tmp_path):
    storage = open_storage(f"gs://{gcs_bucket}/p")
    storage.resumable_threshold = storage.chunk_bytes = 256 << 10
    payload = os.urandom(700_000)
    (tmp_path / "big").write_bytes(payload)
    storage.put(tmp_path / "big", "big", stored_hash(payload))
    assert storage.stat("big").xxh3_64 == stored_hash(payload)
    assert storage.get_bytes("big") == payload


@pytest.mark.parametrize("what", ["object", "bucket"])
def test_s3_missing_object_or_bucket_fails_at_once(s3_server, s3_bucket, what):
    """404 is not retried: one request, and the error names the URL."""
    bucket = s3_bucket if what == "object" else "no-such-bucket-here"
    storage = open_storage(f"s3://{bucket}/p", RetryPolicy(attempts=5, base_delay=5.0))
    with pytest.raises(NotFoundError, match=f"s3://{bucket}/p/index.json"):
        storage.get_bytes("index.json")
    assert s3_server.count("GET", f"/{bucket}/p/index.json") == 1


@pytest.mark.parametrize("what", ["object", "bucket"])
def test_gcs_missing_object_or_bucket_fails_at_once(gcs_bucket, what):
    bucket = gcs_bucket if what == "object" else "no-such-bucket-here"
    storage = open_storage(f"gs://{bucket}/p", RetryPolicy(attempts=5, base_delay=5.0))
    with pytest.raises(NotFoundError, match=f"gs://{bucket}/p/index.json"):
        storage.get_bytes("index.json")
    with pytest.raises(NotFoundError, match=f"gs://{bucket}/p/x"):
        storage.stat("x")


def test_s3_access_denied_fails_at_once_naming_the_url(s3_auth_server, monkeypatch, caplog):
    """A 403 is final (no retry, no backoff) and neither the error nor the log holds secrets."""
    secret = "very-secret-key-material-123"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_auth_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage = open_storage("s3://private-bucket/data", RetryPolicy(attempts=5, base_delay=5.0))
    with caplog.at_level(logging.DEBUG, logger="streamshards"):
        with pytest.raises(PermissionDeniedError, match="s3://private-bucket/data/index.json") as e:
            storage.get_bytes("index.json")
    assert secret not in str(e.value) and secret not in caplog.text
    assert caplog.records == []  # not even a retry warning


def test_sdks_are_optional_and_imported_only_for_their_urls():
    """import streamshards (storage, cache, transfer too) loads no SDK; a missing one names
    the extra to install."""
    code = """
import sys, streamshards, streamshards.storage, streamshards.sources, streamshards.transfer
from streamshards.storage import open_storage
open_storage('/tmp/x')
loaded = [m for m in sys.modules if m.startswith(('boto3', 'botocore', 'google'))]
assert not loaded, loaded
sys.modules['boto3'] = sys.modules['google.cloud'] = None
for url in ('s3://b/p', 'gs://b/p'):
    try:
        open_storage(url)
    except ImportError as err:
        print(err)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "s3:// URLs need boto3: pip install 'streamshards[s3]'",
        "gs:// URLs need google-cloud-storage: pip install 'streamshards[gcs]'",
    ]


def test_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="unsupported URL scheme 'http'"):
        open_storage("http://example.com/data")
