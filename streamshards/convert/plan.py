"""Shard plans for a distributed convert: where each shard starts, from per-unit counts alone.

Pure functions of integers and numpy arrays (no I/O). Given the units in input order and, per
unit, the documents kept, they cut the output exactly where the one-process writer
(``pack.TokenPacker``/``pack.RawPacker`` feeding one ``ShardWriter``) would, so one task per
shard can write it independently and the bytes still match a local run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Part of one unit that a shard holds: unit ``unit`` (in packing order), [start, stop).

    Tokenized: positions in the unit's token stream (kept documents with BOS/EOS). Raw:
    positions among the unit's kept documents.
    """

    unit: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    """One shard: its number, its sample count, and the unit pieces it is made of, in order."""

    number: int
    samples: int
    pieces: tuple[Piece, ...]
    pad: bool = False  # tokenized --tail pad: the last row is completed with the pad id


def sample_bytes(encoded_sizes: int, num_columns: int) -> int:
    """A sample's size as ShardWriter counts it against the size limit (8 bytes a column)."""
    return encoded_sizes + 8 * num_columns


def rows_per_shard(row_bytes: int, size_limit: int) -> int:
    """Fixed-size token rows a shard holds: ShardWriter fills up to the limit, at least one."""
    return max(1, size_limit // sample_bytes(row_bytes, 1))


def token_stream(
    lengths: np.ndarray,
    tokens: np.ndarray,
    keep: np.ndarray | None,
    bos: int | None,
    eos: int | None,
    dtype: np.dtype,
) -> np.ndarray:
    """A unit's kept documents as one token stream ``[BOS] doc [EOS] ...`` (TokenPacker's)."""
    ends = np.cumsum(lengths)
    pieces = []
    bos_row = np.array([bos], dtype=dtype) if bos is not None else None
    eos_row = np.array([eos], dtype=dtype) if eos is not None else None
    for i in range(len(lengths)):
        if keep is not None and not keep[i]:
            continue
        if bos_row is not None:
            pieces.append(bos_row)
        pieces.append(tokens[ends[i] - lengths[i] : ends[i]].astype(dtype, copy=False))
        if eos_row is not None:
            pieces.append(eos_row)
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


def stream_length(
    lengths: np.ndarray, keep: np.ndarray | None, bos: int | None, eos: int | None
) -> int:
    """Tokens a unit adds to the stream: its kept documents plus one BOS/EOS each."""
    kept = lengths if keep is None else lengths[keep]
    extra = (bos is not None) + (eos is not None)
    return int(kept.sum()) + extra * len(kept)


def _pieces(bounds: np.ndarray, start: int, stop: int) -> tuple[Piece, ...]:
    """The unit pieces covering global positions [start, stop); ``bounds`` are prefix sums."""
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    pieces = []
    unit = first
    while unit < len(bounds) - 1 and bounds[unit] < stop:
        lo, hi = max(start, int(bounds[unit])), min(stop, int(bounds[unit + 1]))
        if hi > lo:
            pieces.append(Piece(unit, lo - int(bounds[unit]), hi - int(bounds[unit])))
        unit += 1
    return tuple(pieces)


def plan_token_shards(
    unit_tokens: list[int], seq_len: int, rows_per_shard: int, tail: str
) -> tuple[list[ShardPlan], int]:
    """Shard k holds rows [k·R, (k+1)·R) of the stream cut every ``seq_len`` tokens.

    Returns the plans and the tokens left after the last full row (dropped or padded by
    ``tail``, as ``TokenPacker.finish`` does).
    """
    bounds = np.zeros(len(unit_tokens) + 1, dtype=np.int64)
    np.cumsum(np.asarray(unit_tokens, dtype=np.int64), out=bounds[1:])
    total = int(bounds[-1])
    full_rows, left = divmod(total, seq_len)
    rows = full_rows + (1 if left and tail == "pad" else 0)
    plans = []
    for number, first in enumerate(range(0, rows, rows_per_shard)):
        last = min(rows, first + rows_per_shard)
        stop = min(last * seq_len, total)
        pad = last * seq_len > total
        pieces = _pieces(bounds, first * seq_len, stop)
        plans.append(ShardPlan(number, last - first, pieces, pad))
    return plans, left


def plan_raw_shards(unit_sizes: list[np.ndarray], size_limit: int) -> list[ShardPlan]:
    """Cut kept documents (``unit_sizes``: per unit, each kept sample's size) where
    ShardWriter would: a sample starts a new shard when it would take a non-empty one past
    the limit."""
    starts = [0]
    raw = 0
    count = 0
    base = 0
    for sizes in unit_sizes:
        cum = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=cum[1:])
        pos = 0
        while pos < len(sizes):
            fit = int(np.searchsorted(cum, size_limit - raw + cum[pos], side="right")) - 1
            if fit <= pos:
                if count:
                    starts.append(base + pos)
                    raw = count = 0
                    continue
                fit = pos + 1  # a sample bigger than the limit gets a shard of its own
            raw += int(cum[fit] - cum[pos])
            count += fit - pos
            pos = fit
            if pos < len(sizes):
                starts.append(base + pos)
                raw = count = 0
        base += len(sizes)
    if base == 0:
        return []
    bounds = np.zeros(len(unit_sizes) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in unit_sizes], out=bounds[1:])
    ends = starts[1:] + [base]
    return [
        ShardPlan(number, stop - start, _pieces(bounds, start, stop))
        for number, (start, stop) in enumerate(zip(starts, ends))
    ]


def token_rows(stream: np.ndarray, seq_len: int, pad: bool, pad_id: int | None) -> list[bytes]:
    """A shard's token stream as encoded rows; with ``pad``, the last row is completed."""
    rows, left = divmod(len(stream), seq_len)
    encoded = [row.tobytes() for row in stream[: rows * seq_len].reshape(rows, seq_len)]
    if pad and left:
        row = np.full(seq_len, pad_id, dtype=stream.dtype)
        row[:left] = stream[rows * seq_len :]
        encoded.append(row.tobytes())
    return encoded
