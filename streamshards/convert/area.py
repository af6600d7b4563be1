"""A place every node of a cluster reaches: a (shared) local folder, or an s3:// / gs:// prefix.

An engine convert keeps its work (spill files, task results) and writes its shards through
an ``Area``; each file appears whole or not at all (a rename locally, one upload remotely),
so a retried or zombie task that writes it again changes nothing. Only the name of the root
travels to tasks; each process opens its own storage client.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streamshards.util import atomic_write, fsync_folder, is_remote

_storages: dict = {}


@dataclass(frozen=True)
class Area:
    """Files under ``root`` (an absolute folder or a URL), named by relative names."""

    root: str

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    def sub(self, folder: str) -> Area:
        return Area(f"{self.root}/{folder}")

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _storage(self):
        storage = _storages.get(self.root)
        if storage is None:
            from streamshards.storage import open_storage

            storage = _storages[self.root] = open_storage(self.root)
        return storage

    def local_path(self, name: str) -> Path | None:
        """The file's own path when the area is local (write it there atomically), else None."""
        return None if self.remote else Path(self.root) / name

    def size(self, name: str) -> int:
        """The file's size, or -1 when it is missing."""
        from streamshards.storage import NotFoundError

        try:
            if not self.remote:
                return os.stat(Path(self.root) / name).st_size
            return self._storage().stat(name).size
        except (FileNotFoundError, NotFoundError):
            return -1

    def read(self, name: str) -> bytes | None:
        """A small file's bytes, or None when it is missing."""
        from streamshards.storage import NotFoundError

        try:
            if not self.remote:
                return (Path(self.root) / name).read_bytes()
            return self._storage().get_bytes(name)
        except (FileNotFoundError, NotFoundError):
            return None

    def write(self, name: str, data: bytes) -> None:
        """A small file, replaced atomically."""
        if self.remote:
            self._storage().put_bytes(data, name)
        else:
            path = Path(self.root) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)

    def upload(self, finished: Path, name: str) -> None:
        """Publish a finished local file as ``name`` (remote areas only), then delete it."""
        try:
            self._storage().put(finished, name)
        finally:
            finished.unlink(missing_ok=True)

    @contextmanager
    def fetched(self, name: str) -> Iterator[Path]:
        """A local path holding the file (a temporary download for a remote area)."""
        if not self.remote:
            yield Path(self.root) / name
            return
        handle, path = tempfile.mkstemp(prefix="streamshards-", suffix=f"-{Path(name).name}")
        os.close(handle)
        try:
            self._storage().get(name, path)
            yield Path(path)
        finally:
            os.unlink(path)

    def names(self) -> list[str]:
        """The files directly under the root."""
        if not self.remote:
            try:
                return sorted(e.name for e in os.scandir(self.root) if e.is_file())
            except FileNotFoundError:
                return []
        return [info.name for info in self._storage().list()]

    def delete(self, name: str) -> None:
        if self.remote:
            self._storage().delete(name)
        else:
            (Path(self.root) / name).unlink(missing_ok=True)

    def remove_all(self, folders: tuple[str, ...]) -> None:
        """Delete the area: its files and those of ``folders`` under it."""
        if not self.remote:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for folder in folders:
            sub = self.sub(folder)
            for name in sub.names():
                sub.delete(name)
        for name in self.names():
            self.delete(name)

    def sync(self) -> None:
        """Make renames in a local area durable."""
        if not self.remote:
            fsync_folder(Path(self.root))
