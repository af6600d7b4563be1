"""``streamshards convert``: corpora (JSON lines, Parquet, text) into shards, raw or tokenized.

See docs/CONVERT.md. The command is ``streamshards.convert.cli:convert``; from Python:

>>> from streamshards.convert import ConvertOptions, convert
>>> convert(ConvertOptions(inputs=["c4.json.gz"], out="shards/", tokenizer="tokenizer.json"))
"""

from __future__ import annotations

from collections.abc import Callable

from streamshards.convert.distributed import DistributedJob
from streamshards.convert.errors import ConvertError
from streamshards.convert.options import ConvertOptions, ConvertResult, Progress
from streamshards.convert.run import ConvertJob

__all__ = ["ConvertError", "ConvertOptions", "ConvertResult", "Progress", "convert"]


def convert(
    options: ConvertOptions, progress: Callable[[Progress], None] | None = None
) -> ConvertResult:
    """Run a convert job (see ConvertOptions) on its engine; resumes an interrupted one with
    the same options. The local engine runs ``ConvertJob``; any other, ``DistributedJob``."""
    if options.engine != "local":
        return DistributedJob(options, progress).run()
    return ConvertJob(options, progress).run()
