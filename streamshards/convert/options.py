"""The options of a convert job and what it reports back: plain data, no behaviour."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from streamshards.convert.errors import ConvertError


@dataclass
class ConvertOptions:
    """The options of ``streamshards convert``; see ``streamshards convert --help``."""

    inputs: Sequence[str]
    out: str
    text_field: str = "text"
    keep_fields: Sequence[str] = ()
    compression: str | None = "zstd"
    size_limit: str | int = "64MB"
    workers: int | None = None
    on_error: str = "fail"
    txt_per_line: bool = False
    tokenizer: str | None = None
    seq_len: int = 2048
    eos_id: int | None = None
    bos_id: int | None = None
    tail: str = "drop"
    min_chars: int | None = None
    max_chars: int | None = None
    dedup: bool = False
    user_filter: str | None = None
    unit_size: str | int = "2MB"
    overwrite: bool = False
    engine: str = "local"


@dataclass
class Progress:
    """Where a running job is: input bytes consumed (of the total), documents and tokens."""

    bytes_done: int
    bytes_total: int
    documents: int
    tokens: int
    tasks_done: int = 0  # engine runs: tasks finished of those known so far
    tasks_total: int = 0


@dataclass
class ConvertResult:
    """What a finished job did, for the summary table."""

    out: str
    documents_read: int = 0
    documents_written: int = 0
    samples: int = 0
    tokens: int = 0
    shards: int = 0
    bytes_in: int = 0
    bytes_read: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    units: int = 0
    units_reused: int = 0
    dropped: dict = field(default_factory=dict)
    bad_records: dict = field(default_factory=dict)
    already_done: bool = False
    engine: str = "local"
    tasks: int = 0  # engine runs: tasks run, and attempts that were retries
    tasks_retried: int = 0
    publish_seconds: float = 0.0  # engine runs: from the last task's end to the index written


def parse_keep_fields(specs: Sequence[str], text_field: str) -> tuple[tuple[str, str], ...]:
    """``url``, ``timestamp`` or ``meta:json`` -> ((name, column type), ...)."""
    fields = []
    for spec in specs:
        name, _, ctype = spec.partition(":")
        ctype = ctype or "str"
        if not name or ctype not in ("str", "json"):
            raise ConvertError(f"--keep-fields {spec!r}: expected NAME or NAME:json")
        if name in ("text", text_field) or name in (f for f, _ in fields):
            raise ConvertError(f"--keep-fields {spec!r}: column {name!r} is already kept")
        fields.append((name, ctype))
    return tuple(fields)
