"""Where a stream's index and shards come from: the interface the dataset reads through.

A local dataset is read in place. A remote one (s3://, gs://) is mirrored into a node-shared
cache folder by ``streamshards.cache.RemoteSource``, which implements the same interface.
A MosaicML MDS or LitData folder is read in place too (``streamshards.interop``): its index
is presented as a native ``Index`` and its shards as views with ``ShardView``'s interface.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from streamshards.format import ShardView
from streamshards.index import INDEX_NAME, Index, load_index, parse_index_bytes
from streamshards.interop import ForeignFormat, load_foreign
from streamshards.util import local_path, url_scheme


class ShardSource:
    """The index of one dataset and local paths to its shards."""

    index: Index
    #: How many shards one reader may keep open at once; ``None`` means no limit beyond the
    #: dataset's memory budget. A bounded cache sets it so that readers leave room to evict.
    max_open: int | None = None
    #: The MDS or LitData reader of a foreign dataset; ``None`` for a native one.
    foreign: ForeignFormat | None = None

    def path(self, shard: int) -> Path:
        """A local, complete file of shard number ``shard``; may block to fetch it."""
        raise NotImplementedError

    def open_view(self, shard: int) -> ShardView:
        """Verify shard number ``shard`` and return a view of its samples (``ShardView``'s
        interface; a foreign dataset's own reader when it is one)."""
        if self.foreign is not None:
            return self.foreign.open_view(self.path(shard), shard)
        from streamshards.reader import open_shard

        return open_shard(self.path(shard), self.index.shards[shard], self.index)

    def complete_foreign(self) -> None:
        """Let a foreign reader finish its index from the first shard (an MDS token column's
        row length); call once the source can serve ``path(0)``."""
        if self.foreign is not None:
            self.index = self.foreign.complete(self)

    def prefetch(self, shards: list[int]) -> None:
        """Hint that these shards are needed next, in this order; never blocks."""

    def release(self, shard: int) -> None:
        """This process no longer reads ``shard``; a cache may evict it."""

    def wait_seconds(self) -> float:
        """Total seconds callers of ``path`` spent waiting for data."""
        return 0.0


def read_index(text: bytes, source: str, options: dict[str, Any]) -> tuple[Index, Any]:
    """(index, foreign reader or None) of index.json bytes: native, MDS or LitData."""
    foreign = load_foreign(text, source, options)
    if foreign is not None:
        return foreign.index, foreign
    if options:
        raise ValueError(
            f"{source}: option(s) {sorted(options)} apply to MDS or LitData datasets only"
        )
    return parse_index_bytes(text, source), None


class LocalSource(ShardSource):
    """A dataset folder on a local file system, read in place.

    ``options`` go to a foreign dataset's reader: ``block_size`` (LitData TokensLoader) and
    ``pkl_as_bytes`` (MDS pickle columns as raw bytes, never unpickled).
    """

    def __init__(self, folder: str | os.PathLike, **options: Any):
        self.folder = Path(local_path(folder))
        path = self.folder / INDEX_NAME
        if not path.is_file():  # missing, or not a regular file: the native reader says which
            self.index = load_index(self.folder)
            return
        self.index, self.foreign = read_index(path.read_bytes(), str(path), options)
        self.complete_foreign()

    def path(self, shard: int) -> Path:
        return self.folder / self.index.shards[shard].file


def uses_cache(remote: str | None, local: str | os.PathLike | None) -> bool:
    """Whether ``open_source(remote, local)`` mirrors ``remote`` into a cache folder: any remote
    but a ``file://`` URL given alone, which is read in place."""
    return remote is not None and (local is not None or url_scheme(remote) != "file")


def open_source(remote: str | None, local: str | os.PathLike | None, **options) -> ShardSource:
    """The source for a (remote, local) pair: local only, or a remote mirrored into ``local``."""
    if not uses_cache(remote, local):
        if remote is None and local is None:
            raise ValueError("give local= (a dataset folder) or remote= (a URL) or both")
        return LocalSource(remote if local is None else local, **options)
    from streamshards.cache import RemoteSource

    return RemoteSource(remote, local, **options)
