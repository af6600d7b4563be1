"""A remote OUT: converted into a local staging folder, then published through the storage layer."""

from __future__ import annotations

import os
import tempfile
import threading
import uuid

import pytest
from convert_helpers import TOKENIZER, dataset_files, run_convert, sample_docs, write_jsonl

from streamshards.transfer import download


@pytest.fixture
def s3_bucket(monkeypatch):
    """A fresh bucket on moto's S3 server, reached through AWS_ENDPOINT_URL like any S3."""
    import boto3
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server(
        "127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=True
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"convert-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield name
    server.shutdown()
    thread.join()


def test_converting_to_s3_publishes_the_same_dataset_as_a_local_run(
    tmp_path, s3_bucket, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "staging"))
    os.makedirs(tmp_path / "staging")
    path = write_jsonl(tmp_path / "d.jsonl.gz", sample_docs(200), "gzip")
    args = ["--tokenizer", TOKENIZER, "--seq-len", "128", "--size-limit", "50KB", "--quiet"]
    url = f"s3://{s3_bucket}/tok"
    run_convert(path, url, *args)
    run_convert(path, tmp_path / "local", *args)
    download(url, tmp_path / "fetched", progress=False)
    assert dataset_files(tmp_path / "fetched") == dataset_files(tmp_path / "local")
    assert os.listdir(tmp_path / "staging") == []


def test_an_unknown_url_scheme_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "staging"))
    os.makedirs(tmp_path / "staging")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    failed = run_convert(path, "ftp://host/data", expect_ok=False)
    assert failed.exit_code != 0 and "unsupported URL scheme 'ftp'" in failed.output
    assert os.listdir(tmp_path / "staging") == []
