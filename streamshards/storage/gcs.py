"""``gs://bucket/prefix`` through google-cloud-storage.

Credentials and project come from the standard chain (application default credentials,
GOOGLE_APPLICATION_CREDENTIALS, GOOGLE_CLOUD_PROJECT); STORAGE_EMULATOR_HOST points the
client at an emulator. The SDK's own retries are turned off (``retry=None``) so that one
bounded policy (streamshards.storage.retry) governs every request.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO

try:
    import google.api_core.exceptions as api_errors
    import google.auth.exceptions as auth_errors
    import requests.exceptions
    from google.cloud import storage as gcs
    from google.cloud.storage.exceptions import DataCorruption
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gs:// URLs need google-cloud-storage: pip install 'streamshards[gcs]'"
    ) from err

from streamshards.storage.base import (
    HASH_METADATA_KEY,
    ObjectInfo,
    Progress,
    Storage,
    split_bucket_url,
)
from streamshards.storage.retry import (
    NotFoundError,
    PermissionDeniedError,
    RetryPolicy,
    StorageError,
    TransientError,
)

# Files at least this big go up as a resumable upload in chunks of CHUNK_BYTES (a multiple
# of 256 KiB, as the API requires), so a lost connection costs one chunk, not the file.
RESUMABLE_THRESHOLD = 64 << 20
CHUNK_BYTES = 16 << 20
_TRANSIENT_ERRORS = (
    api_errors.TooManyRequests,
    api_errors.InternalServerError,
    api_errors.BadGateway,
    api_errors.ServiceUnavailable,
    api_errors.GatewayTimeout,
    api_errors.RequestRangeNotSatisfiable,
    auth_errors.TransportError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    DataCorruption,
    ConnectionError,
    TimeoutError,
)


class GCSStorage(Storage):
    """Objects under ``gs://bucket/prefix``."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, timeout: float = 60.0):
        super().__init__(url, retry, timeout)
        self.bucket_name, self.prefix = split_bucket_url(self.url, "gs")
        self.resumable_threshold = RESUMABLE_THRESHOLD
        self.chunk_bytes = CHUNK_BYTES
        self._local = threading.local()
        self._local_pid = os.getpid()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def bucket(self) -> gcs.Bucket:
        """The bucket handle of a client made per thread and process (clients share no state)."""
        if self._local_pid != os.getpid():
            self._local = threading.local()
            self._local_pid = os.getpid()
        if getattr(self._local, "bucket", None) is None:
            self._local.bucket = gcs.Client().bucket(self.bucket_name)
        return self._local.bucket

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _list(self) -> list[ObjectInfo]:
        start = f"{self.prefix}/" if self.prefix else ""
        blobs = self.bucket.list_blobs(
            prefix=start, delimiter="/", retry=None, timeout=self.timeout
        )
        return [
            ObjectInfo(b.name[len(start) :], b.size, (b.metadata or {}).get(HASH_METADATA_KEY))
            for b in blobs
        ]

    def _stat(self, name: str) -> ObjectInfo:
        blob = self.bucket.get_blob(self.key(name), retry=None, timeout=self.timeout)
        if blob is None:
            raise NotFoundError(f"{self.url_of(name)}: not found (missing bucket or object)")
        return ObjectInfo(name, blob.size, (blob.metadata or {}).get(HASH_METADATA_KEY))

    def _read_into(self, name: str, f: BinaryIO, progress: Progress) -> None:
        self.bucket.blob(self.key(name)).download_to_file(f, retry=None, timeout=self.timeout)
        if progress:
            progress(f.tell())

    def _put(self, source: Path, name: str, xxh3_64: str | None, progress: Progress) -> None:
        size = source.stat().st_size
        chunk = self.chunk_bytes if size >= self.resumable_threshold else None
        blob = self.bucket.blob(self.key(name), chunk_size=chunk)
        if xxh3_64:
            blob.metadata = {HASH_METADATA_KEY: xxh3_64}
        blob.upload_from_filename(str(source), retry=None, timeout=self.timeout)
        if progress:
            progress(size)

    def _put_bytes(self, data: bytes, name: str) -> None:
        self.bucket.blob(self.key(name)).upload_from_string(data, retry=None, timeout=self.timeout)

    def _delete(self, name: str) -> None:
        self.bucket.blob(self.key(name)).delete(retry=None, timeout=self.timeout)

    def _translate(self, err: Exception, url: str) -> StorageError | None:
        if isinstance(err, auth_errors.DefaultCredentialsError):
            return PermissionDeniedError(
                f"{url}: no Google credentials found (run 'gcloud auth application-default "
                "login' or set GOOGLE_APPLICATION_CREDENTIALS)"
            )
        if isinstance(err, api_errors.NotFound):
            return NotFoundError(f"{url}: not found (missing bucket or object)")
        if isinstance(err, (api_errors.Forbidden, api_errors.Unauthorized)):
            return PermissionDeniedError(
                f"{url}: access denied (HTTP {err.code}); check the credentials and the "
                "bucket's IAM permissions"
            )
        if isinstance(err, _TRANSIENT_ERRORS):
            return TransientError(f"{url}: {type(err).__name__}: {err}")
        if isinstance(err, api_errors.GoogleAPICallError):
            return StorageError(f"{url}: HTTP {err.code}: {err.message}")
        return None
