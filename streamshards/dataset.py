"""StreamingDataset: one or more streams of shards read in a deterministic, resumable order.

The dataset composes the pure order (``streamshards.order``) with shard sources
(``streamshards.sources``). Where the next global batch starts is a ``Cursor``
(epoch, samples_seen) owned by whoever iterates and passed to ``iter_batches``; the dataset's
``state_dict``/``load_state_dict`` encode and check it. See docs/ORDER.md.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

import numpy as np
import torch.distributed as dist
import xxhash
from torch.utils.data import IterableDataset, get_worker_info

from streamshards.ahead import OpenAhead, usable_cores
from streamshards.columns import ColumnType
from streamshards.format import ShardView
from streamshards.order import (
    Cursor,
    EpochOrder,
    allocate,
    batch_positions,
    epoch_end,
    epoch_spans,
    groups,
    rank_batches,
    stream_spans,
    worker_blocks,
)
from streamshards.sources import ShardSource, open_source, uses_cache

STATE_VERSION = 1
STATE_KEYS = ("version", "epoch", "samples_seen", "fingerprint", "order")

# Open shard views kept per process at most: each is a memory map, and Linux allows 65,530
# maps per process by default (vm.max_map_count), shared with everything else in it.
MAX_OPEN_VIEWS = 4096
# A shard's (stream, shard) packed into one int64 as stream * SHARD_KEY_STRIDE + shard, so one
# sort groups a batch by shard; no stream has 2**40 shards.
SHARD_KEY_STRIDE = 1 << 40
# Samples read as one gather when the dataset is iterated sample by sample: per-read costs
# are paid once per this many samples rather than once per (small) batch.
JOIN_SAMPLES = 256
# Global positions looked up per call to the order: a lookup costs per call, so this many
# share one, while the one chunk of lookahead stays a few hundred KiB.
LOOKUP_CHUNK = 16384
# Compressed local shards decompressed ahead of an in-process reader at once, each on its own
# thread (no more threads than usable cores); the views held ahead take at most a quarter of
# the memory budget.
AHEAD_THREADS = 2


@dataclass
class Stream:
    """One dataset in a mixture, with how many of its samples an epoch takes.

    ``proportion``: share of ``epoch_size`` (all streams then need one); ``repeat``: a
    multiple of the stream's size (0.5 down-samples, 2 up-samples); ``choose``: an absolute
    count per epoch. None of them: every sample once.
    """

    local: str | os.PathLike | None = None
    remote: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.proportion, self.repeat, self.choose)]
        if sum(given) > 1:
            raise ValueError("a Stream takes at most one of proportion, repeat, choose")


def world() -> tuple[int, int]:
    """(rank, world size): torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamingDataset(IterableDataset):
    """Samples from local or remote shards, exactly once per epoch across ranks and workers.

    Iterating yields sample dicts in this rank's share of the global order, batch by batch
    of ``batch_size``; a plain ``DataLoader(ds, batch_size=ds.batch_size)`` or
    ``StreamingDataLoader(ds)`` gives the same batches for any ``num_workers``.
    """

    def __init__(
        self,
        local: str | os.PathLike | None = None,
        remote: str | None = None,
        *,
        streams: Sequence[Stream] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        batch_size: int = 1,
        drop_last: bool = False,
        num_partitions: int = 64,
        shuffle_window: int = 65536,
        epoch_size: int | None = None,
        cache_limit: int | str | None = None,
        prefetch: int = 4,
        memory_budget: int | str = "2GiB",
    ):
        from streamshards.util import parse_size

        if streams is None:
            streams = [Stream(local=local, remote=remote)]
        elif local is not None or remote is not None:
            raise ValueError("give either local=/remote= or streams=, not both")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.streams = list(streams)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.num_partitions = int(num_partitions)
        self.shuffle_window = int(shuffle_window)
        self.memory_budget = parse_size(memory_budget)
        self.sources: list[ShardSource] = [
            open_source(s.remote, s.local, **_source_options(s, cache_limit, prefetch))
            for s in self.streams
        ]
        first = self.sources[0].index.columns
        for stream, source in zip(self.streams, self.sources):
            if source.index.columns != first:
                raise ValueError(
                    f"stream {stream.local or stream.remote} has columns {source.index.columns}, "
                    f"the first stream has {first}"
                )
        self.columns = dict(first)
        self.column_types = self.sources[0].index.column_types
        self.provenance: list[dict[str, Any]] = [s.index.provenance for s in self.sources]
        self.stream_starts = np.cumsum([0] + [s.index.num_samples for s in self.sources])
        self.take = self._take_per_stream(epoch_size)
        self.epoch_size = sum(self.take)
        self.fingerprint = self._fingerprint()
        self.cursor = Cursor()  # where iterating the dataset itself starts (not a loader's)
        # Pinned by StreamingDataLoader before it starts workers, which may not see the
        # process group; None means ask ``world()`` at iteration time.
        self.rank_world: tuple[int, int] | None = None
        self._order: EpochOrder | None = None
        self._views: OrderedDict[tuple[int, int], ShardView] = OrderedDict()
        self._view_bytes = 0
        self._ahead: OpenAhead | None = None

    @property
    def epoch(self) -> int:
        """The epoch where iterating the dataset itself starts."""
        return self.cursor.epoch

    @property
    def samples_seen(self) -> int:
        """Samples of ``epoch`` (all ranks) that iterating the dataset itself skips."""
        return self.cursor.samples_seen

    def column_type(self, name: str) -> ColumnType:
        """The parsed type of column ``name`` (its kind, and dtype and shape for arrays)."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r} (columns: {', '.join(self.columns)})")
        return self.column_types[list(self.columns).index(name)]

    def _take_per_stream(self, epoch_size: int | None) -> list[int]:
        sizes = [s.index.num_samples for s in self.sources]
        props = [s.proportion for s in self.streams]
        if any(p is not None for p in props):
            if any(p is None for p in props):
                raise ValueError("when one stream has a proportion, every stream needs one")
            return allocate(props, sum(sizes) if epoch_size is None else int(epoch_size))
        if epoch_size is not None:
            raise ValueError("epoch_size goes with proportion= on the streams")
        take = []
        for stream, size in zip(self.streams, sizes):
            if stream.choose is not None:
                take.append(int(stream.choose))
            elif stream.repeat is not None:
                take.append(round(stream.repeat * size))
            else:
                take.append(size)
        return take

    def order_config(self) -> dict[str, Any]:
        """Everything besides the data that decides the global order (saved in the state)."""
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_partitions": self.num_partitions,
            "shuffle_window": self.shuffle_window,
            "drop_last": self.drop_last,
            "take": self.take,
        }

    def _fingerprint(self) -> str:
        digest = xxhash.xxh3_64()
        for source in self.sources:
            for info in source.index.shards:
                digest.update(f"{info.hash}:{info.samples};".encode())
            digest.update(b"|")
        digest.update(json.dumps(self.order_config(), sort_keys=True).encode())
        return digest.hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        """Open shard views (memory maps) stay behind when workers are spawned."""
        state = dict(self.__dict__)
        state["_views"], state["_view_bytes"], state["_order"] = OrderedDict(), 0, None
        state["_ahead"] = None
        return state

    # Random access -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Samples across all streams: the domain of ``ds[i]``."""
        return int(self.stream_starts[-1])

    def __getitem__(self, sample_id: int) -> dict:
        """Sample ``sample_id`` of the streams' concatenation, in O(log shards)."""
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample {sample_id} out of range 0..{len(self) - 1}")
        stream = 0
        if len(self.sources) > 1:
            stream = int(np.searchsorted(self.stream_starts, sample_id, side="right")) - 1
            sample_id -= int(self.stream_starts[stream])
        shard, j = self.sources[stream].index.shard_of(sample_id)
        view = self._views.get((stream, shard)) or self._view(stream, shard)
        return view.sample(j)

    def _view(self, stream: int, shard: int) -> ShardView:
        key = (stream, shard)
        view = self._views.get(key)
        if view is not None:
            self._views.move_to_end(key)
            return view
        source = self.sources[stream]
        info = source.index.shards[shard]
        ahead = self._opener()
        view = ahead.take(key) if ahead is not None else None
        if view is None:
            view = source.open_view(shard)
        self._views[key] = view
        self._view_bytes += info.raw_bytes if info.compression else 0
        if source.max_open is not None:
            mine = [k for k in self._views if k[0] == stream]
            for old in mine[: max(0, len(mine) - source.max_open)]:
                self._close(old)
        while len(self._views) > 1 and (
            self._view_bytes > self.memory_budget or len(self._views) > MAX_OPEN_VIEWS
        ):
            self._close(next(iter(self._views)))
        return view

    def _opener(self) -> OpenAhead | None:
        """The threads that open compressed shards ahead; None in a loader worker, whose
        siblings share the cores."""
        if get_worker_info() is not None:
            return None
        if self._ahead is None:
            threads = min(AHEAD_THREADS, usable_cores())
            self._ahead = OpenAhead(self.sources, threads, self.memory_budget // 4)
        return self._ahead

    def _close(self, key: tuple[int, int]) -> None:
        """Forget one open shard view and tell its source that this process is done with it."""
        stream, shard = key
        del self._views[key]
        info = self.sources[stream].index.shards[shard]
        self._view_bytes -= info.raw_bytes if info.compression else 0
        self.sources[stream].release(shard)

    def _release_cached(self) -> None:
        """Release the open shards of size-limited caches, so that the caches may evict them."""
        for key in list(self._views):
            if self.sources[key[0]].max_open is not None:
                self._close(key)

    # Order and state -----------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration of the dataset itself at the beginning of ``epoch``."""
        self.cursor = Cursor(int(epoch), 0)

    def order(self, epoch: int) -> EpochOrder:
        """The global order of ``epoch`` (built in O(shards), kept for the current epoch)."""
        if self._order is None or self._order.epoch != epoch:
            spans = [
                stream_spans(
                    k, np.array([s.samples for s in src.index.shards]), take, self.seed, epoch
                )
                for k, (src, take) in enumerate(zip(self.sources, self.take))
            ]
            self._order = EpochOrder(
                epoch_spans(spans, self.shuffle, self.seed, epoch),
                self.shuffle,
                self.seed,
                epoch,
                self.num_partitions,
                self.shuffle_window,
            )
        return self._order

    def epoch_end(self) -> int:
        """Positions delivered per epoch at the current world size (see ``order.epoch_end``)."""
        _, world_size = self.rank_world or world()
        return epoch_end(self.epoch_size, self.batch_size * world_size, world_size, self.drop_last)

    def num_batches(self, cursor: Cursor | None = None) -> int:
        """Batches this rank yields from ``cursor`` (default: the dataset's) to the epoch's end."""
        cursor = self.cursor if cursor is None else cursor
        rank, world_size = self.rank_world or world()
        end = self.epoch_end()
        first = min(cursor.samples_seen, end)
        return rank_batches(first, end, rank, world_size, self.batch_size)[1]

    def state_dict(self, num_samples_seen: int, epoch: int | None = None) -> dict[str, Any]:
        """A resumable state after ``num_samples_seen`` samples (all ranks) of ``epoch``."""
        return self.encode_cursor(Cursor(self.epoch if epoch is None else epoch, num_samples_seen))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue iterating the dataset itself from ``state`` (checked by ``decode_cursor``)."""
        self.cursor = self.decode_cursor(state)

    def encode_cursor(self, cursor: Cursor) -> dict[str, Any]:
        """The state of ``cursor``: plain values, with what it is valid for (data and order)."""
        epoch, samples_seen = cursor.epoch, cursor.samples_seen
        if samples_seen >= self.epoch_end():
            epoch, samples_seen = epoch + 1, 0
        return {
            "version": STATE_VERSION,
            "epoch": int(epoch),
            "samples_seen": int(samples_seen),
            "fingerprint": self.fingerprint,
            "order": self.order_config(),
        }

    def decode_cursor(self, state: dict[str, Any]) -> Cursor:
        """The cursor ``state`` holds, refusing a malformed state or one for other data or order.

        Nothing is coerced: a field of the wrong type is an error naming it, never converted.
        """
        if not isinstance(state, dict):
            raise ValueError(f"loader state must be a dict, got {type(state).__name__}")
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state is missing key(s): {', '.join(missing)}")
        extra = sorted(repr(k) for k in state if k not in STATE_KEYS)
        if extra:
            raise ValueError(
                f"loader state has unknown key(s): {', '.join(extra)} "
                f"(expected {', '.join(STATE_KEYS)})"
            )
        version = state["version"]
        if not _is_int(version) or version != STATE_VERSION:
            raise ValueError(f"loader state version {version!r} is not {STATE_VERSION}")
        for name in ("epoch", "samples_seen"):
            value = state[name]
            if not _is_int(value):
                raise ValueError(
                    f"loader state field {name} must be an integer, "
                    f"got {value!r} ({type(value).__name__})"
                )
            if value < 0:
                raise ValueError(f"loader state field {name} must not be negative, got {value}")
        saved = state["order"]
        if not isinstance(saved, dict):
            raise ValueError(f"loader state field order must be a dict, got {type(saved).__name__}")
        mine = self.order_config()
        changed = [
            k for k in (*mine, *(k for k in saved if k not in mine)) if not _same(saved, mine, k)
        ]
        if changed:
            diffs = ", ".join(
                f"{k}: saved {saved.get(k, 'nothing')!r}, now {mine.get(k, 'nothing')!r}"
                for k in changed
            )
            raise ValueError(f"loader state was saved with a different order config ({diffs})")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"loader state was saved for different data (fingerprint "
                f"{state['fingerprint']!r}, this dataset {self.fingerprint}): shards were added,"
                " removed or rewritten"
            )
        end = self.epoch_end()
        if state["samples_seen"] > end:
            raise ValueError(
                f"loader state field samples_seen {state['samples_seen']} is past the end of the "
                f"epoch ({end} samples at this world size and batch size)"
            )
        return Cursor(state["epoch"], state["samples_seen"])

    # Iteration -----------------------------------------------------------------------------

    def position_runs(
        self, cursor: Cursor, max_run: int = 1, joined: bool = False
    ) -> Iterator[list[np.ndarray]]:
        """Global positions of each batch this rank and data-loader worker reads from ``cursor``,
        in runs of consecutive batches (``order.worker_blocks``; single batches by default);
        ``joined`` gives each run as one array rather than one per batch.

        The runs are dealt to workers in turn, which is the order in which a DataLoader collects
        them, so the batches do not depend on ``num_workers``.
        """
        rank, world_size = self.rank_world or world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        end = self.epoch_end()
        if cursor.samples_seen > end:  # the world size changed since the state was checked
            raise ValueError(f"samples_seen {cursor.samples_seen} is past the epoch's end {end}")
        if end < self.epoch_size and not self.drop_last and rank == 0 and worker == 0:
            warnings.warn(
                f"the last {self.epoch_size - end} samples of epoch {cursor.epoch} are fewer than "
                f"the {world_size} ranks and are dropped",
                stacklevel=2,
            )
        first, num_batches = rank_batches(
            cursor.samples_seen, end, rank, world_size, self.batch_size
        )
        rank_end = end if first < end else first
        for start, count in worker_blocks(num_batches, worker, workers, max_run):
            if joined:
                yield [batch_positions(first, start, rank_end, world_size, self.batch_size, count)]
                continue
            yield [
                batch_positions(first, batch, rank_end, world_size, self.batch_size)
                for batch in range(start, start + count)
            ]

    def _hint(self, located: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Tell each source which of its shards come next, and open compressed ones ahead."""
        streams, shards, _ = located
        ahead = self._opener()
        for k, source in enumerate(self.sources):
            wanted = shards[streams == k]
            if not len(wanted):
                continue
            _, first = np.unique(wanted, return_index=True)
            hinted = [int(s) for s in wanted[np.sort(first)]]
            source.prefetch(hinted)
            if ahead is not None and source.opens_ahead:
                infos = source.index.shards
                ahead.want(
                    [
                        ((k, s), infos[s].raw_bytes)
                        for s in hinted
                        if infos[s].compression and (k, s) not in self._views
                    ]
                )

    def iter_batches(
        self, cursor: Cursor | None = None, *, join: int = 1
    ) -> Iterator[dict[str, Any]]:
        """This rank's (and worker's) batches from ``cursor`` as dicts of column arrays or lists.

        Without a cursor the dataset's own is used, and moved to the next epoch once this one
        is read in-process. ``join`` consecutive batches are read as one, which amortises
        per-read costs when the caller splits them into samples anyway.
        """
        own = cursor is None
        cursor = self.cursor if cursor is None else cursor
        info = get_worker_info()
        if info is None or info.num_workers == 1:  # every batch is ours: runs of ``join``
            reads = self.position_runs(cursor, join, joined=True)
        else:
            batches = (b for run in self.position_runs(cursor) for b in run)
            first = list(islice(batches, 1))  # read alone: the first batch waits on one batch
            reads = chain([first] if first else [], iter(lambda: list(islice(batches, join)), []))
        yield from self._read_units(cursor, reads)
        if own and info is None:
            self.cursor = cursor.next_epoch()

    def iter_runs(self, cursor: Cursor, max_run: int) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """This worker's runs of up to ``max_run`` consecutive batches, each read as one batch,
        with the sizes of the batches it holds: the unit a loader worker hands over."""
        runs = self.position_runs(cursor, max_run)
        pending: list[list[int]] = []

        def reads() -> Iterator[list[np.ndarray]]:
            for run in runs:
                pending.append([len(b) for b in run])
                yield run

        for batch in self._read_units(cursor, reads()):
            yield batch, pending.pop(0)

    def _read_units(
        self, cursor: Cursor, units: Iterator[list[np.ndarray]]
    ) -> Iterator[dict[str, Any]]:
        """Read each unit (a list of position arrays) as one batch, releasing cached shards
        when the caller stops."""
        try:
            for located in self._located(self.order(cursor.epoch), units):
                yield self.read(*located)
        finally:  # local shards stay open for the next epoch; cached ones make room
            self._release_cached()

    def _located(
        self, order: EpochOrder, units: Iterator[list[np.ndarray]], chunk: int = LOOKUP_CHUNK
    ) -> Iterator[tuple]:
        """(stream, shard, sample) arrays of each unit, looked up ``chunk`` positions at a time.

        Lookups are batched because their cost is per call, not per position; each chunk is
        looked up, and its shards handed to the sources to prefetch, one chunk ahead of use.
        """

        def chunks() -> Iterator[list[tuple]]:
            limit = 1  # the first lookup is of the first unit alone, so the first read is quick
            while True:
                group: list[np.ndarray] = []
                size = 0
                for unit in units:
                    group.append(np.concatenate(unit))
                    size += len(group[-1])
                    if size >= limit:
                        break
                limit = chunk
                if not group:
                    return
                located = order.locate(np.concatenate(group))
                self._hint(located)
                bounds = [0, *np.cumsum([len(g) for g in group]).tolist()]
                spans = list(zip(bounds, bounds[1:]))
                yield [tuple(a[lo:hi] for a in located) for lo, hi in spans]

        pending = chunks()
        current = next(pending, None)
        if current is not None:  # the second chunk's shards are hinted before the first read,
            ahead = next(pending, None)  # so that threads open them while it waits for its own
            yield from current
            current = ahead
        while current is not None:
            yield current[0]
            ahead = next(pending, None)
            yield from current[1:]
            current = ahead

    def read(self, streams: np.ndarray, shards: np.ndarray, js: np.ndarray) -> dict[str, Any]:
        """Gather samples (stream, shard, index) into one batch: arrays for fixed-size columns."""
        parts = [
            (self._view(int(streams[i[0]]), int(shards[i[0]])), i, js[i])
            for i in groups(streams * SHARD_KEY_STRIDE + shards)
        ]
        batch: dict[str, Any] = {}
        for col, (name, ctype) in enumerate(zip(self.columns, self.column_types)):
            if ctype.array is not None:
                dtype, shape = ctype.array
                out = np.empty((len(js), *shape), dtype=dtype)
                if len(parts) == 1:  # one shard: gather straight into the batch, no temporary
                    view, _, rows = parts[0]
                    np.take(view.fixed_array(col), rows, axis=0, out=out)
                else:
                    for view, idx, rows in parts:
                        out[idx] = view.fixed_array(col)[rows]
                batch[name] = out
            else:
                values: list[Any] = [None] * len(js)
                for view, idx, rows in parts:
                    for slot, value in zip(idx.tolist(), view.values(col, rows)):
                        values[slot] = value
                batch[name] = values
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        scalars = [n for n, t in zip(self.columns, self.column_types) if t.scalar]
        for batch in self.iter_batches(join=max(1, JOIN_SAMPLES // self.batch_size)):
            for name in scalars:
                batch[name] = batch[name].tolist()
            if len(batch) == 1:  # the common case of one column: no per-sample zip
                ((name, values),) = batch.items()
                for value in values:
                    yield {name: value}
            else:
                names = list(batch)
                for row in zip(*batch.values()):
                    yield dict(zip(names, row))


def _is_int(value: Any) -> bool:
    """An int proper: bools are ints to Python but never a count or an epoch here."""
    return isinstance(value, int) and not isinstance(value, bool)


def _same(saved: dict[str, Any], mine: dict[str, Any], key: str) -> bool:
    """Whether ``key`` is present in both and equal in value and JSON type (True is not 1)."""
    if key not in saved or key not in mine:
        return False
    return json.dumps(saved[key], default=repr) == json.dumps(mine[key], default=repr)


def _source_options(stream: Stream, cache_limit: int | str | None, prefetch: int) -> dict[str, Any]:
    if not uses_cache(stream.remote, stream.local):
        return dict(stream.options)
    return {"cache_limit": cache_limit, "prefetch": prefetch, **stream.options}
