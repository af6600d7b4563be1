"""The ordered writer: finished units, in input order, into shards (dedup, packing, the tail).

Only this single pass sees documents in input order, so it owns the decisions that depend on
earlier documents: exact deduplication (first occurrence wins) and where sequences are cut.
Tokens carry over from one unit to the next, so no token is lost at a unit, worker or shard
boundary; only the last partial sequence of the whole dataset is dropped or padded.
"""

from __future__ import annotations

import numpy as np

from streamshards.writer import ShardWriter


class Deduper:
    """Remembers the dedup key of every document written so far (16 bytes each)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def keep(self, hashes: np.ndarray | None, count: int) -> list[bool]:
        """Per document of a unit: True for the first occurrence of its key, else False."""
        if hashes is None:
            return [True] * count
        raw = hashes.tobytes()
        keep = []
        for i in range(count):
            key = raw[16 * i : 16 * i + 16]
            keep.append(key not in self.seen)
            self.seen.add(key)
        return keep


class RawPacker:
    """One sample per document: the text column and the kept fields."""

    def __init__(self, writer: ShardWriter, num_columns: int, dedup: Deduper | None):
        self.writer = writer
        self.num_columns = num_columns
        self.dedup = dedup
        self.samples = 0

    def add(self, arrays: dict[str, np.ndarray]) -> int:
        """Write a unit's documents; returns how many were dropped as duplicates."""
        offsets = [arrays[f"offsets{k}"] for k in range(self.num_columns)]
        data = [arrays[f"data{k}"].tobytes() for k in range(self.num_columns)]
        count = len(offsets[0]) - 1
        keep = self.dedup.keep(arrays.get("hashes"), count) if self.dedup else [True] * count
        for i in range(count):
            if keep[i]:
                self.writer.write_encoded([d[o[i] : o[i + 1]] for d, o in zip(data, offsets)])
        written = sum(keep)
        self.samples += written
        return count - written


class TokenPacker:
    """Documents joined as ``[BOS] doc [EOS]`` and cut into rows of ``seq_len`` tokens."""

    def __init__(
        self,
        writer: ShardWriter,
        seq_len: int,
        dtype: np.dtype,
        bos_id: int | None,
        eos_id: int | None,
        dedup: Deduper | None,
    ):
        self.writer = writer
        self.seq_len = seq_len
        self.dtype = dtype
        self.bos = np.array([bos_id], dtype=dtype) if bos_id is not None else None
        self.eos = np.array([eos_id], dtype=dtype) if eos_id is not None else None
        self.dedup = dedup
        self.carry = np.empty(0, dtype=dtype)
        self.samples = 0
        self.document_tokens = 0

    def add(self, arrays: dict[str, np.ndarray]) -> int:
        """Append a unit's documents to the stream, write every full row; returns duplicates."""
        lengths = arrays["lengths"]
        tokens = arrays["tokens"]
        count = len(lengths)
        keep = self.dedup.keep(arrays.get("hashes"), count) if self.dedup else [True] * count
        ends = np.cumsum(lengths)
        pieces = [self.carry]
        for i in range(count):
            if not keep[i]:
                continue
            if self.bos is not None:
                pieces.append(self.bos)
            pieces.append(tokens[ends[i] - lengths[i] : ends[i]])
            if self.eos is not None:
                pieces.append(self.eos)
            self.document_tokens += int(lengths[i])
        stream = np.concatenate(pieces)
        rows = len(stream) // self.seq_len
        for row in stream[: rows * self.seq_len].reshape(rows, self.seq_len):
            self.writer.write_encoded([row.tobytes()])
        self.samples += rows
        self.carry = stream[rows * self.seq_len :].copy()
        return count - sum(keep)

    def finish(self, tail: str, pad_id: int) -> dict:
        """Handle the last partial row by ``tail`` ("drop" or "pad") and describe what was done."""
        left = len(self.carry)
        if left and tail == "pad":
            row = np.full(self.seq_len, pad_id, dtype=self.dtype)
            row[:left] = self.carry
            self.writer.write_encoded([row.tobytes()])
            self.samples += 1
            return {
                "policy": "pad",
                "tokens": left,
                "pad_id": pad_id,
                "pad_tokens": self.seq_len - left,
            }
        return {"policy": "drop", "tokens_dropped": left}
