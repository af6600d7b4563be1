"""``s3://bucket/prefix`` through boto3: AWS, MinIO, R2 and other S3-compatible stores.

Endpoint, region and credentials come from boto3's standard chain (AWS_ENDPOINT_URL,
AWS_PROFILE, AWS_ACCESS_KEY_ID, instance roles, ...). botocore's own retries are turned off
so that one bounded policy (streamshards.storage.retry) governs every request.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

try:
    import boto3
    import botocore.exceptions as boto_errors
    import urllib3.exceptions
    from botocore.client import BaseClient
    from botocore.config import Config
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("s3:// URLs need boto3: pip install 'streamshards[s3]'") from err

from streamshards.storage.base import (
    CHUNK_BYTES,
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

MULTIPART_THRESHOLD = 64 << 20
PART_BYTES = 16 << 20
MAX_PARTS = 10_000
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {
    "401",
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_TRANSIENT = {
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
_TRANSIENT_ERRORS = (
    boto_errors.ConnectionError,
    boto_errors.HTTPClientError,
    boto_errors.IncompleteReadError,
    boto_errors.ResponseStreamingError,
    boto_errors.FlexibleChecksumError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``; big files go up as parallel multipart uploads."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, timeout: float = 60.0):
        super().__init__(url, retry, timeout)
        self.bucket, self.prefix = split_bucket_url(self.url, "s3")
        self.multipart_threshold = MULTIPART_THRESHOLD
        self.part_bytes = PART_BYTES
        self.part_workers = 4
        self._client = None
        self._client_pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_client_pid": -1}

    @property
    def client(self) -> BaseClient:
        """One boto3 client per process (clients are thread-safe, not fork-safe)."""
        if self._client is None or self._client_pid != os.getpid():
            config = Config(
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                max_pool_connections=32,
            )
            self._client = boto3.session.Session().client("s3", config=config)
            self._client_pid = os.getpid()
        return self._client

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _list(self) -> list[ObjectInfo]:
        start = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start, Delimiter="/"
        )
        return [
            ObjectInfo(obj["Key"][len(start) :], obj["Size"])
            for page in pages
            for obj in page.get("Contents", [])
        ]

    def _stat(self, name: str) -> ObjectInfo:
        head = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        return ObjectInfo(name, head["ContentLength"], head["Metadata"].get(HASH_METADATA_KEY))

    def _read_into(self, name: str, f: BinaryIO, progress: Progress) -> None:
        response = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
            f.write(chunk)
            if progress:
                progress(len(chunk))
        if f.tell() != response["ContentLength"]:
            raise TransientError(
                f"{self.url_of(name)}: body has {f.tell()} bytes, "
                f"Content-Length says {response['ContentLength']}"
            )

    def _put(self, source: Path, name: str, xxh3_64: str | None, progress: Progress) -> None:
        metadata = {HASH_METADATA_KEY: xxh3_64} if xxh3_64 else {}
        size = source.stat().st_size
        if size < self.multipart_threshold:
            with open(source, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket, Key=self.key(name), Body=body, Metadata=metadata
                )
            if progress:
                progress(size)
            return
        self._put_multipart(source, name, size, metadata, progress)

    def _put_multipart(
        self, source: Path, name: str, size: int, metadata: dict, progress: Progress
    ) -> None:
        """Upload parts in parallel, each retried on its own; abort the upload on failure."""
        key = self.key(name)
        part_bytes = max(self.part_bytes, math.ceil(size / MAX_PARTS))
        upload_id = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, Metadata=metadata
        )["UploadId"]

        def send(number: int) -> dict:
            with open(source, "rb") as f:
                f.seek((number - 1) * part_bytes)
                body = f.read(part_bytes)
            url = f"{self.url_of(name)} (part {number})"
            etag = self._call(
                url,
                lambda: self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )["ETag"],
            )
            if progress:
                progress(len(body))
            return {"PartNumber": number, "ETag": etag}

        try:
            with ThreadPoolExecutor(self.part_workers) as pool:
                parts = list(pool.map(send, range(1, math.ceil(size / part_bytes) + 1)))
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as err:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # the upload failed already; report that error, not this one
                pass
            if isinstance(err, TransientError):
                # The part's retries are spent: do not restart the whole upload on top.
                raise StorageError(str(err)) from err
            raise

    def _put_bytes(self, data: bytes, name: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)

    def _delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name))

    def _translate(self, err: Exception, url: str) -> StorageError | None:
        if isinstance(err, boto_errors.NoCredentialsError):
            return PermissionDeniedError(
                f"{url}: no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID, "
                "or run where an instance role applies)"
            )
        if isinstance(err, boto_errors.ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = err.response.get("Error", {}).get("Message", "")
            if code in _NOT_FOUND or status == 404:
                detail = message or "missing bucket or object"
                return NotFoundError(f"{url}: not found ({code}: {detail})")
            if code in _DENIED or status in (401, 403):
                return PermissionDeniedError(
                    f"{url}: access denied ({code}); check the credentials (AWS_PROFILE, "
                    "AWS_ACCESS_KEY_ID) and the bucket policy"
                )
            if code in _TRANSIENT or status >= 500 or status == 429:
                return TransientError(f"{url}: {code} (HTTP {status})")
            return StorageError(f"{url}: {code}: {message}")
        if isinstance(err, _TRANSIENT_ERRORS):
            return TransientError(f"{url}: {type(err).__name__}: {err}")
        return None
