"""streamshards: compressed, indexed shards and an exactly-once, instantly resumable loader."""

__version__ = "0.1.0"

from streamshards.index import Index, load_index  # noqa: E402
from streamshards.writer import ShardWriter  # noqa: E402

__all__ = ["Index", "ShardWriter", "load_index", "__version__"]
