"""The interface the dataset reads shards through, and reading an index of any shape.

A MosaicML MDS or LitData index (``streamshards.interop``) is presented as a native
``Index`` and its shards as views with ``ShardView``'s interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamshards.format import ShardView
from streamshards.index import Index, decode_index_json, parse_index
from streamshards.interop import ForeignFormat, load_foreign


class ShardSource:
    """The index of one dataset and local paths to its shards."""

    index: Index
    #: How many shards one reader may keep open at once; ``None`` means no limit beyond the
    #: dataset's memory budget. A bounded cache sets it so that readers leave room to evict.
    max_open: int | None = None
    #: Whether ``open_view`` may run on another thread ahead of use (``streamshards.ahead``):
    #: true for native shards read in place, where it only reads and decompresses a file.
    opens_ahead: bool = False
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
    obj = decode_index_json(text, source)  # decoded once, for detection and parsing
    foreign = load_foreign(obj, source, options)
    if foreign is not None:
        return foreign.index, foreign
    if options:
        raise ValueError(
            f"{source}: option(s) {sorted(options)} apply to MDS or LitData datasets only"
        )
    return parse_index(obj, source), None
