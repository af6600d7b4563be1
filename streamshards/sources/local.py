"""A dataset folder on a local or network file system, read in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from streamshards.index import INDEX_NAME, load_index
from streamshards.sources.base import ShardSource, read_index
from streamshards.util import local_path


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
        self.opens_ahead = self.foreign is None

    def path(self, shard: int) -> Path:
        return self.folder / self.index.shards[shard].file
