"""A dataset folder on a local or network file system, by path or ``file://`` URL."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from streamshards.storage.base import CHUNK_BYTES, ObjectInfo, Progress, Storage
from streamshards.storage.retry import (
    NotFoundError,
    PermissionDeniedError,
    RetryPolicy,
    StorageError,
)
from streamshards.util import atomic_file, local_path


class LocalStorage(Storage):
    """Objects are files in one folder; writes go through a temporary name and a rename."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, timeout: float = 60.0):
        super().__init__(url, retry, timeout)
        self.root = Path(local_path(self.url))

    def url_of(self, name: str) -> str:
        return str(self.root / name)

    def _list(self) -> list[ObjectInfo]:
        with os.scandir(self.root) as entries:
            return [
                ObjectInfo(e.name, e.stat().st_size)
                for e in entries
                if e.is_file() and not e.name.startswith(".")
            ]

    def _stat(self, name: str) -> ObjectInfo:
        return ObjectInfo(name, (self.root / name).stat().st_size)

    def _read_into(self, name: str, f: BinaryIO, progress: Progress) -> None:
        with open(self.root / name, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                f.write(chunk)
                if progress:
                    progress(len(chunk))

    def _write(self, name: str, fill) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.root / name) as f:
            fill(f)

    def _put(self, source: Path, name: str, xxh3_64: str | None, progress: Progress) -> None:
        def fill(f: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, CHUNK_BYTES)
            if progress:
                progress(source.stat().st_size)

        self._write(name, fill)

    def _put_bytes(self, data: bytes, name: str) -> None:
        self._write(name, lambda f: f.write(data))

    def _delete(self, name: str) -> None:
        (self.root / name).unlink()

    def _translate(self, err: Exception, url: str) -> StorageError | None:
        if isinstance(err, FileNotFoundError):
            return NotFoundError(f"{url}: no such file or folder")
        if isinstance(err, PermissionError):
            return PermissionDeniedError(f"{url}: permission denied")
        return None
