"""``streamshards convert``: corpora (JSON lines, Parquet, text) into shards, raw or tokenized.

See docs/CONVERT.md. The command is ``streamshards.convert.cli:convert``; from Python:

>>> from streamshards.convert import ConvertOptions, convert
>>> convert(ConvertOptions(inputs=["c4.json.gz"], out="shards/", tokenizer="tokenizer.json"))
"""

from streamshards.convert.errors import ConvertError
from streamshards.convert.options import ConvertOptions, ConvertResult, Progress
from streamshards.convert.run import convert

__all__ = ["ConvertError", "ConvertOptions", "ConvertResult", "Progress", "convert"]
