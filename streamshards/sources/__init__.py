"""Where a stream's index and shards come from: the interface the dataset reads through.

A local dataset is read in place (``LocalSource``). A remote one (s3://, gs://) is mirrored
into a node-shared cache folder by ``RemoteSource``, which implements the same interface
(``ShardSource``). MDS and LitData datasets are read through either (``streamshards.interop``).
"""

from __future__ import annotations

import os

from streamshards.sources.base import ShardSource, read_index
from streamshards.sources.local import LocalSource
from streamshards.sources.remote import RemoteSource
from streamshards.util import url_scheme

__all__ = [
    "LocalSource",
    "RemoteSource",
    "ShardSource",
    "open_source",
    "read_index",
    "uses_cache",
]


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
    return RemoteSource(remote, local, **options)
