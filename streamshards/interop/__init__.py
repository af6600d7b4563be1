"""Reading MosaicML Streaming (MDS) and LitData datasets in place, and converting them.

A foreign dataset presents itself as a native ``Index`` and per-shard views with the
interface of ``ShardView``; ``streamshards.sources`` picks the reader by the index's shape.
"""

from streamshards.interop.detect import ForeignFormat, index_kind, load_foreign

__all__ = ["ForeignFormat", "index_kind", "load_foreign"]
