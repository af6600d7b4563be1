"""The global sample order of an epoch, as pure functions of integers and numpy arrays.

An epoch is a list of *spans* (stream, shard, first sample, count) covering the epoch's
samples. With shuffling, the spans are permuted, their concatenation is cut into
``num_partitions`` contiguous partitions, and each partition is shuffled within blocks of
``shuffle_window`` samples. Global position ``t`` reads partition ``t % P`` at index
``t // P``, so a rank that takes every W-th position reads only the partitions
``p % W == rank`` (download locality, O5) when W divides P. See docs/ORDER.md.

Memory: O(spans) per epoch plus O(shuffle_window) per partition block in use; nothing grows
with the number of samples (O6).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_SPAN_TAG = 0x5350414E
_BLOCK_TAG = 0x424C4F4B
_CHOOSE_TAG = 0x43484F53
# A partition holds at most size // window + 1 blocks, so a stride one larger than that makes
# part * stride + block one distinct integer per (partition, block): one sort groups them.
_BLOCK_KEY_SPARE = 2


def rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (stable across runs and hosts)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *keys])))


@dataclass(frozen=True)
class Cursor:
    """Where the next global batch starts: ``samples_seen`` positions into ``epoch``.

    One value, owned by whoever iterates (the loader, or the dataset iterated directly).
    """

    epoch: int = 0
    samples_seen: int = 0

    def advanced(self, samples: int, end: int) -> Cursor:
        """This cursor moved on by ``samples`` positions, stopping at the epoch's ``end``."""
        return Cursor(self.epoch, min(self.samples_seen + samples, end))

    def next_epoch(self) -> Cursor:
        """The start of the following epoch."""
        return Cursor(self.epoch + 1, 0)


@dataclass(frozen=True)
class Spans:
    """Contiguous sample ranges making up an epoch, in epoch order."""

    stream: np.ndarray
    shard: np.ndarray
    start: np.ndarray
    count: np.ndarray

    def __post_init__(self) -> None:
        cum = np.zeros(len(self.count) + 1, dtype=np.int64)
        np.cumsum(self.count, out=cum[1:])
        object.__setattr__(self, "cum", cum)

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def locate(self, concat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stream, shard, sample within shard) for positions in the spans' concatenation."""
        span = np.searchsorted(self.cum, concat, side="right") - 1
        return self.stream[span], self.shard[span], self.start[span] + (concat - self.cum[span])


def stream_spans(stream: int, shard_sizes: np.ndarray, take: int, seed: int, epoch: int) -> Spans:
    """Spans taking exactly ``take`` samples of one stream this epoch.

    ``take // N`` whole copies of the stream, then the remainder from whole shards in a
    per-epoch seeded order, the last one cut short: exact counts, shard-level locality.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    total = int(sizes.sum())
    if take and not total:
        raise ValueError(f"stream {stream} is empty but {take} samples were asked of it")
    copies, rest = divmod(take, total) if total else (0, 0)
    ids = np.arange(len(sizes), dtype=np.int64)
    shard = [np.tile(ids, copies)]
    count = [np.tile(sizes, copies)]
    if rest:
        order = rng(seed, _CHOOSE_TAG, stream, epoch).permutation(len(sizes))
        cum = np.cumsum(sizes[order])
        last = int(np.searchsorted(cum, rest))
        picked = order[: last + 1]
        part = sizes[picked].copy()
        part[-1] -= int(cum[last]) - rest
        shard.append(picked)
        count.append(part)
    shard_arr = np.concatenate(shard)
    count_arr = np.concatenate(count)
    keep = count_arr > 0
    shard_arr, count_arr = shard_arr[keep], count_arr[keep]
    return Spans(
        np.full(len(shard_arr), stream, dtype=np.int64),
        shard_arr,
        np.zeros(len(shard_arr), dtype=np.int64),
        count_arr,
    )


def epoch_spans(streams: list[Spans], shuffle: bool, seed: int, epoch: int) -> Spans:
    """All streams' spans of an epoch, in a seeded per-epoch order when shuffling."""
    parts = [
        np.concatenate([getattr(s, f) for s in streams])
        for f in ("stream", "shard", "start", "count")
    ]
    if shuffle:
        perm = rng(seed, _SPAN_TAG, epoch).permutation(len(parts[0]))
        parts = [p[perm] for p in parts]
    return Spans(*parts)


def allocate(weights: list[float], total: int) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"proportions must be non-negative and not all zero: {weights}")
    exact = w / w.sum() * total
    base = np.floor(exact).astype(np.int64)
    short = total - int(base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:short]] += 1
    return [int(x) for x in base]


class EpochOrder:
    """Maps global positions of one epoch to (stream, shard, sample within shard).

    Built in O(spans); each lookup is vectorised and touches only the partition blocks it
    needs, whose permutations are kept in a small LRU.
    """

    def __init__(
        self,
        spans: Spans,
        shuffle: bool,
        seed: int,
        epoch: int,
        num_partitions: int,
        shuffle_window: int,
        cached_blocks: int = 256,
    ):
        if num_partitions < 1 or shuffle_window < 1:
            raise ValueError("num_partitions and shuffle_window must be at least 1")
        self.spans = spans
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.size = spans.total
        self.parts = num_partitions
        self.window = shuffle_window
        self.part_len, self.part_rem = divmod(self.size, num_partitions)
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_blocks = cached_blocks

    def _block_perm(self, part: int, block: int, length: int) -> np.ndarray:
        key = (part, block)
        perm = self._blocks.get(key)
        if perm is None:
            perm = rng(self.seed, _BLOCK_TAG, self.epoch, part, block).permutation(length)
            self._blocks[key] = perm
            if len(self._blocks) > self._cached_blocks:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return perm

    def concat_positions(self, positions: np.ndarray) -> np.ndarray:
        """Where global positions fall in the concatenation of the epoch's spans."""
        t = np.asarray(positions, dtype=np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.size):
            raise IndexError(f"position out of range 0..{self.size - 1}")
        if not self.shuffle:
            return t
        part, q = t % self.parts, t // self.parts
        part_start = part * self.part_len + np.minimum(part, self.part_rem)
        part_size = self.part_len + (part < self.part_rem)
        block, offset = q // self.window, q % self.window
        inner = np.empty_like(t)
        stride = self.size // self.window + _BLOCK_KEY_SPARE
        for idx in groups(part * stride + block):
            p, b = int(part[idx[0]]), int(block[idx[0]])
            length = int(min(self.window, part_size[idx[0]] - b * self.window))
            inner[idx] = self._block_perm(p, b, length)[offset[idx]]
        return part_start + block * self.window + inner

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stream, shard, sample within shard) of each global position."""
        return self.spans.locate(self.concat_positions(positions))


def groups(keys: np.ndarray) -> list[np.ndarray]:
    """Indices of ``keys`` grouped by equal key (one sort, no per-key scan)."""
    if len(keys) and keys[0] == keys[-1] and (keys == keys[0]).all():
        return [np.arange(len(keys))]  # the common case of a batch from one shard
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    bounds = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), len(keys)]
    return [order[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def epoch_end(epoch_size: int, global_batch: int, world_size: int, drop_last: bool) -> int:
    """The number of positions delivered in an epoch.

    With ``drop_last`` only whole global batches; otherwise the last partial global batch
    too, provided every rank gets at least one of its samples (else it is dropped, since a
    rank with nothing to yield would leave the others waiting in a collective).
    """
    whole = epoch_size - epoch_size % global_batch
    rest = epoch_size - whole
    if drop_last or rest < world_size:
        return whole
    return epoch_size


def rank_batches(
    start: int, end: int, rank: int, world_size: int, batch_size: int
) -> tuple[int, int]:
    """(first position, number of batches) of a rank reading positions ``start + rank + k*W``.

    ``start`` is a multiple of the global batch (``batch_size * world_size``).
    """
    first = start + rank
    count = max(0, -(-(end - first) // world_size)) if first < end else 0
    return first, -(-count // batch_size)


def worker_blocks(
    num_batches: int, worker: int, workers: int, max_block: int
) -> Iterator[tuple[int, int]]:
    """(first batch, count) of each run of consecutive batches that ``worker`` of ``workers`` reads.

    Runs are dealt round-robin, as a DataLoader collects its workers' items, so taking them in
    turn restores the batch order. Round ``r`` deals runs of ``min(2**r, max_block)`` batches:
    the first batch comes after one batch's work, and later runs amortise per-item costs.
    Cost: O(num_batches / max_block + log max_block) integers, computed lazily.
    """
    start, size = 0, 1
    while start < num_batches:
        for w in range(workers):
            count = min(size, num_batches - start)
            if count <= 0:
                return
            if w == worker:
                yield start, count
            start += count
        size = min(2 * size, max_block)


def batch_positions(
    first: int, batch: int, rank_end: int, world_size: int, batch_size: int, count: int = 1
) -> np.ndarray:
    """Global positions of a rank's ``batch``-th batch and the ``count - 1`` after it, in order
    (a rank's positions step by world size, and each batch starts where the last one ended)."""
    lo = first + batch * batch_size * world_size
    hi = min(lo + count * batch_size * world_size, rank_end)
    return np.arange(lo, hi, world_size, dtype=np.int64)
