"""Where a stream's index and shards come from: the interface the dataset reads through.

A local dataset is read in place. A remote one (s3://, gs://) is mirrored into a node-shared
cache folder by ``streamshards.cache.RemoteSource``, which implements the same interface.
"""

from __future__ import annotations

import os
from pathlib import Path

from streamshards.index import Index, load_index


class ShardSource:
    """The index of one dataset and local paths to its shards."""

    index: Index
    #: How many shards one reader may keep open at once; ``None`` means no limit beyond the
    #: dataset's memory budget. A bounded cache sets it so that readers leave room to evict.
    max_open: int | None = None

    def path(self, shard: int) -> Path:
        """A local, complete file of shard number ``shard``; may block to fetch it."""
        raise NotImplementedError

    def prefetch(self, shards: list[int]) -> None:
        """Hint that these shards are needed next, in this order; never blocks."""

    def release(self, shard: int) -> None:
        """This process no longer reads ``shard``; a cache may evict it."""

    def wait_seconds(self) -> float:
        """Total seconds callers of ``path`` spent waiting for data."""
        return 0.0


class LocalSource(ShardSource):
    """A dataset folder on a local file system, read in place."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(str(folder).removeprefix("file://"))
        self.index = load_index(self.folder)

    def path(self, shard: int) -> Path:
        return self.folder / self.index.shards[shard].file


def open_source(remote: str | None, local: str | os.PathLike | None, **options) -> ShardSource:
    """The source for a (remote, local) pair: local only, or a remote mirrored into ``local``."""
    if remote is None or remote.startswith("file://") and local is None:
        if remote is None and local is None:
            raise ValueError("give local= (a dataset folder) or remote= (a URL) or both")
        return LocalSource(remote if local is None else local)
    from streamshards.cache import RemoteSource

    return RemoteSource(remote, local, **options)
