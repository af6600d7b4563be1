"""The ``Storage`` interface every backend implements, with what all backends share.

A ``Storage`` is one dataset folder (a bucket prefix); object names are plain file names in
it. Backends only translate SDK calls and errors; retries, length checks and atomic local
files live here once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from streamshards.storage.retry import (
    NotFoundError,
    RetryPolicy,
    StorageError,
    TransientError,
)
from streamshards.util import atomic_file

# Object metadata key holding the stored file's xxh3-64 (hyphen: some servers drop "_").
HASH_METADATA_KEY = "xxh3-64"
CHUNK_BYTES = 1 << 20
Progress = Callable[[int], object] | None
T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its name relative to the storage root, size, and recorded xxh3-64 if any."""

    name: str
    size: int
    xxh3_64: str | None = None


class Storage:
    """A folder of objects at ``url`` with retried, length-checked transfers."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def url_of(self, name: str) -> str:
        """The full URL of object ``name``, for messages."""
        return f"{self.url}/{name}"

    # Backend primitives: one request each, SDK errors left to ``_translate``.
    def _list(self) -> list[ObjectInfo]:
        raise NotImplementedError

    def _stat(self, name: str) -> ObjectInfo:
        raise NotImplementedError

    def _read_into(self, name: str, f: BinaryIO, progress: Progress) -> None:
        raise NotImplementedError

    def _put(self, source: Path, name: str, xxh3_64: str | None, progress: Progress) -> None:
        raise NotImplementedError

    def _put_bytes(self, data: bytes, name: str) -> None:
        raise NotImplementedError

    def _delete(self, name: str) -> None:
        raise NotImplementedError

    def _translate(self, err: Exception, url: str) -> StorageError | None:
        """The StorageError an SDK exception means, or None to let it propagate unchanged."""
        return None

    def _call(self, url: str, request: Callable[[], T]) -> T:
        """Run one request under the retry policy, with SDK errors translated."""

        def attempt() -> T:
            try:
                return request()
            except StorageError:
                raise
            except Exception as err:
                translated = self._translate(err, url)
                if translated is None:
                    raise
                raise translated from err

        return self.retry.call(attempt)

    def list(self) -> list[ObjectInfo]:
        """Every object directly under the root, sorted by name."""
        return sorted(self._call(self.url, self._list), key=lambda o: o.name)

    def stat(self, name: str) -> ObjectInfo:
        """Size and recorded hash of ``name``; NotFoundError if missing."""
        return self._call(self.url_of(name), lambda: self._stat(name))

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except NotFoundError:
            return False
        return True

    def read_into(
        self, name: str, f: BinaryIO, expected_size: int | None = None, progress: Progress = None
    ) -> int:
        """Write object ``name`` into the seekable file ``f`` from its start; returns its size.

        Each try starts the file over, so a dropped connection never leaves a spliced body;
        a body shorter or longer than ``expected_size`` counts as a transient failure.
        """
        url = self.url_of(name)

        def request() -> int:
            f.seek(0)
            f.truncate()
            self._read_into(name, f, progress)
            got = f.tell()
            if expected_size is not None and got != expected_size:
                raise TransientError(f"{url}: body has {got} bytes, expected {expected_size}")
            return got

        return self._call(url, request)

    def get_bytes(self, name: str) -> bytes:
        """The whole content of a small object (index.json)."""
        with tempfile.TemporaryFile() as f:
            self.read_into(name, f)
            f.seek(0)
            return f.read()

    def get(
        self,
        name: str,
        dest: str | os.PathLike,
        expected_size: int | None = None,
        progress: Progress = None,
    ) -> Path:
        """Download ``name`` to ``dest`` through a temporary file renamed when complete."""
        dest = Path(dest)
        with atomic_file(dest) as f:
            self.read_into(name, f, expected_size, progress)
        return dest

    def put(
        self,
        source: str | os.PathLike,
        name: str,
        xxh3_64: str | None = None,
        progress: Progress = None,
    ) -> None:
        """Upload a local file as ``name`` (multipart when big), recording its hash if given."""
        self._call(self.url_of(name), lambda: self._put(Path(source), name, xxh3_64, progress))

    def put_bytes(self, data: bytes, name: str) -> None:
        """Upload a small object in one request (index.json)."""
        self._call(self.url_of(name), lambda: self._put_bytes(data, name))

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing object is not an error."""
        try:
            self._call(self.url_of(name), lambda: self._delete(name))
        except NotFoundError:
            pass


def split_bucket_url(url: str, scheme: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of ``scheme://bucket/prefix``."""
    rest = url[len(scheme) + 3 :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name; use {scheme}://BUCKET/PREFIX")
    return bucket, prefix.strip("/")
