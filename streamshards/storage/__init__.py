"""Object storage behind one small interface: local folders, file://, s3:// and gs://.

The interface and what backends share are in ``base.py``; ``open_storage`` picks the backend
by URL scheme and imports its SDK only then.
"""

from __future__ import annotations

import os

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
from streamshards.util import url_scheme

__all__ = [
    "CHUNK_BYTES",
    "HASH_METADATA_KEY",
    "NotFoundError",
    "ObjectInfo",
    "PermissionDeniedError",
    "Progress",
    "RetryPolicy",
    "Storage",
    "StorageError",
    "TransientError",
    "open_storage",
    "split_bucket_url",
]


def open_storage(
    url: str | os.PathLike, retry: RetryPolicy | None = None, timeout: float = 60.0
) -> Storage:
    """The storage for a local path, ``file://``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``."""
    text = os.fspath(url)
    scheme = url_scheme(text)
    if scheme == "s3":
        from streamshards.storage.s3 import S3Storage

        return S3Storage(text, retry, timeout)
    if scheme == "gs":
        from streamshards.storage.gcs import GCSStorage

        return GCSStorage(text, retry, timeout)
    if scheme not in (None, "file"):
        raise ValueError(
            f"{text}: unsupported URL scheme {scheme!r}; use s3://, gs://, file:// or a local path"
        )
    from streamshards.storage.local import LocalStorage

    return LocalStorage(text, retry, timeout)
