"""streamshards: compressed, indexed shards and an exactly-once, instantly resumable loader."""

__version__ = "0.1.0"

from streamshards.dataset import Stream, StreamingDataset  # noqa: E402
from streamshards.index import Index, load_index  # noqa: E402
from streamshards.loader import StreamingDataLoader  # noqa: E402
from streamshards.merge import merge  # noqa: E402
from streamshards.writer import ShardWriter  # noqa: E402

__all__ = [
    "Index",
    "ShardWriter",
    "Stream",
    "StreamingDataLoader",
    "StreamingDataset",
    "load_index",
    "merge",
    "__version__",
]
