"""Property tests of the pure order functions: permutation, partition, exact counts."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshards.order import (
    EpochOrder,
    allocate,
    batch_positions,
    epoch_end,
    epoch_spans,
    rank_batches,
    stream_spans,
    worker_blocks,
)

shard_sizes = st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda s: sum(s) > 0)


def _order(sizes, shuffle, seed, epoch, parts, window) -> EpochOrder:
    spans = epoch_spans(
        [stream_spans(0, np.array(sizes), sum(sizes), seed, epoch)], shuffle, seed, epoch
    )
    return EpochOrder(spans, shuffle, seed, epoch, parts, window)


@settings(max_examples=150, deadline=None)
@given(
    shard_sizes,
    st.booleans(),
    st.integers(0, 2**31),
    st.integers(0, 5),
    st.integers(1, 9),
    st.integers(1, 50),
)
def test_epoch_order_is_a_permutation(sizes, shuffle, seed, epoch, parts, window):
    order = _order(sizes, shuffle, seed, epoch, parts, window)
    total = sum(sizes)
    streams, shards, js = order.locate(np.arange(total))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    global_ids = starts[shards] + js
    assert sorted(global_ids.tolist()) == list(range(total))
    assert np.all(js < np.array(sizes)[shards]) and np.all(streams == 0)


@settings(max_examples=60, deadline=None)
@given(shard_sizes, st.integers(0, 1000), st.integers(1, 9), st.integers(1, 50))
def test_lookups_agree_in_any_order_and_grouping(sizes, seed, parts, window):
    """A position maps to the same sample however lookups are batched (lazy = eager)."""
    total = sum(sizes)
    eager = _order(sizes, True, seed, 1, parts, window).concat_positions(np.arange(total))
    lazy = _order(sizes, True, seed, 1, parts, window)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(total)
    for chunk in np.array_split(perm, max(1, total // 7)):
        assert np.array_equal(lazy.concat_positions(chunk), eager[chunk])


@settings(max_examples=100, deadline=None)
@given(shard_sizes, st.integers(0, 200), st.integers(0, 99), st.integers(0, 3))
def test_stream_spans_take_exact_counts(sizes, take, seed, epoch):
    spans = stream_spans(3, np.array(sizes), take, seed, epoch)
    assert spans.total == take
    total = sum(sizes)
    copies, rest = divmod(take, total)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    counts = np.zeros(total, dtype=int)
    for shard, start, count in zip(spans.shard, spans.start, spans.count):
        counts[starts[shard] + start : starts[shard] + start + count] += 1
    assert counts.min() >= copies and counts.max() <= copies + (1 if rest else 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.01, 10), min_size=1, max_size=6), st.integers(0, 10**9))
def test_allocate_sums_exactly(weights, total):
    parts = allocate(weights, total)
    assert sum(parts) == total
    exact = np.array(weights) / sum(weights) * total
    assert np.all(np.abs(np.array(parts) - exact) < 1 + 1e-6)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.integers(1, 9), st.integers(1, 9), st.booleans(), st.integers(0, 30))
def test_ranks_cover_each_position_once(epoch_size, world, batch, drop_last, start_batches):
    """Rank r reads start + r + kW: together the ranks cover [start, end) exactly once."""
    end = epoch_end(epoch_size, batch * world, world, drop_last)
    start = min(start_batches * batch * world, end - end % (batch * world))
    seen = []
    batch_counts = set()
    for rank in range(world):
        first, count = rank_batches(start, end, rank, world, batch)
        batch_counts.add(count)
        rank_end = end if first < end else first
        for b in range(count):
            positions = batch_positions(first, b, rank_end, world, batch)
            assert 0 < len(positions) <= batch
            seen.extend(positions.tolist())
    assert sorted(seen) == list(range(start, end))
    assert len(batch_counts) == 1, "ranks would yield different numbers of batches"
    assert end >= epoch_size - epoch_size % (batch * world)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(1, 9), st.integers(1, 9), st.integers(1, 40), st.data())
def test_a_run_of_batches_is_its_batches_in_order(epoch_size, world, batch, run, data):
    """batch_positions(..., count) equals the ``count`` batches from ``batch`` concatenated,
    up to the rank's end: the in-process reader reads runs of batches as one."""
    end = epoch_end(epoch_size, batch * world, world, False)
    rank = data.draw(st.integers(0, world - 1))
    first, count = rank_batches(0, end, rank, world, batch)
    rank_end = end if first < end else first
    start = data.draw(st.integers(0, max(0, count - 1)))
    joined = batch_positions(first, start, rank_end, world, batch, run)
    single = [batch_positions(first, b, rank_end, world, batch) for b in range(start, count)]
    expected = np.concatenate(single[:run]) if single else np.zeros(0, dtype=np.int64)
    assert joined.tolist() == expected.tolist()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([1, 2, 4, 8]), st.integers(0, 3))
def test_each_rank_reads_about_its_share_of_shards(seed, world, epoch):
    """O5: with W dividing P, a rank touches ~1/W of the shards plus partition edges."""
    shards, per_shard, parts = 400, 50, 16
    order = _order([per_shard] * shards, True, seed, epoch, parts, 64)
    total = shards * per_shard
    touched = []
    for rank in range(world):
        _, shard, _ = order.locate(np.arange(rank, total, world))
        touched.append(set(shard.tolist()))
    assert set().union(*touched) == set(range(shards))
    for rank_shards in touched:
        assert len(rank_shards) <= shards / world + parts / world + 1


@settings(max_examples=300, deadline=None)
@given(num_batches=st.integers(0, 3000), workers=st.integers(1, 8), max_run=st.integers(1, 300))
def test_worker_runs_taken_in_turn_are_every_batch_once_in_order(num_batches, workers, max_run):
    """A DataLoader takes one item from each live worker in turn; that must be batch order."""
    runs = [list(worker_blocks(num_batches, w, workers, max_run)) for w in range(workers)]
    taken: list[int] = []
    turn = 0
    while any(runs):
        if runs[turn % workers]:
            start, count = runs[turn % workers].pop(0)
            assert 1 <= count <= max_run
            taken.extend(range(start, start + count))
        turn += 1
    assert taken == list(range(num_batches))
    firsts = [next(worker_blocks(num_batches, w, workers, max_run), None) for w in range(workers)]
    assert all(f is None or f[1] == 1 for f in firsts)  # the first batch waits on one batch
