"""Adding a column type is one ColumnCodec class and one CODECS line (docs/FORMAT.md)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from streamshards import ShardWriter, StreamingDataset
from streamshards.columns import CODECS, ColumnCodec, parse_column_type


@dataclass(frozen=True)
class UuidCodec(ColumnCodec):
    """The example of docs/FORMAT.md, "Adding a column type": a UUID as its 16 bytes."""

    kind: ClassVar[str] = "uuid"
    fixed_size: ClassVar[int] = 16

    def encode(self, value: Any, column: str) -> bytes:
        if not isinstance(value, uuid.UUID):
            raise ValueError(f"column {column!r}: expected uuid.UUID, got {type(value).__name__}")
        return value.bytes

    def decode(self, buf: memoryview) -> Any:
        return uuid.UUID(bytes=bytes(buf))


@pytest.fixture
def with_uuid(monkeypatch):
    monkeypatch.setitem(CODECS, "uuid", UuidCodec)


IDS = [uuid.UUID(int=k * 0x9E3779B97F4A7C15) for k in range(300)]


def test_a_registered_column_type_is_written_and_read_back_every_way(tmp_path, with_uuid):
    with ShardWriter(tmp_path, {"id": "uuid", "text": "str"}, size_limit="4KB") as writer:
        for k, value in enumerate(IDS):
            writer.write({"id": value, "text": f"t{k}"})
    assert len(writer.shards) > 1
    dataset = StreamingDataset(local=tmp_path)
    assert [sample["id"] for sample in dataset] == IDS
    assert dataset[123] == {"id": IDS[123], "text": "t123"}
    shuffled = StreamingDataset(local=tmp_path, batch_size=64, shuffle=True, seed=3)
    batch = next(iter(shuffled.iter_batches()))
    assert batch["id"] == [IDS[int(text[1:])] for text in batch["text"]]


def test_a_registered_column_type_checks_values_and_is_named_among_the_known(tmp_path, with_uuid):
    with pytest.raises(ValueError, match="column 'id': expected uuid.UUID, got str"):
        with ShardWriter(tmp_path, {"id": "uuid"}) as writer:
            writer.write({"id": "not a uuid"})
    with pytest.raises(ValueError, match=r"unknown type 'uid'; expected one of .*, uuid$"):
        parse_column_type("uid", "id")
    assert str(parse_column_type("uuid")) == "uuid"
