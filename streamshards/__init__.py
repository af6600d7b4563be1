"""streamshards: compressed, indexed shards and an exactly-once, instantly resumable loader."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from streamshards.index import Index, load_index  # noqa: E402
from streamshards.merge import merge  # noqa: E402
from streamshards.writer import ShardWriter  # noqa: E402

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
