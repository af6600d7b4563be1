"""streamshards: compressed, indexed shards and an exactly-once, instantly resumable loader."""

from __future__ import annotations

import importlib
from typing import Any

from streamshards._version import __version__
from streamshards.index import Index, load_index
from streamshards.merge import merge
from streamshards.writer import ShardWriter

# Imported on first use, so the command line and the writer start without loading torch.
_LAZY = {
    "Stream": "streamshards.dataset",
    "StreamingDataset": "streamshards.dataset",
    "StreamingDataLoader": "streamshards.loader",
}

__all__ = ["Index", "ShardWriter", "load_index", "merge", *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamshards' has no attribute {name!r}")
