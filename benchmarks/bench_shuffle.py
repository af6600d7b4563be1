"""Shuffle quality of the partitioned, windowed shuffle beside no shuffle and a full shuffle.

Two measures over one epoch of a synthetic index (no data is read):
- rank correlation (Spearman) between a sample's stored position and its delivered
  position: 1 for no shuffle, about 0 for a uniform random permutation;
- distinct shards per global batch: how many shards one global batch draws from
  (a uniform random permutation sets the ceiling).

    python benchmarks/bench_shuffle.py --shards 2000 --per-shard 4096 --batch 512
"""

from __future__ import annotations

import argparse

import numpy as np

from streamshards.order import EpochOrder, epoch_spans, stream_spans


def spearman(order: np.ndarray) -> float:
    """Rank correlation of stored ids against delivery positions (both are permutations)."""
    positions = np.arange(len(order), dtype=np.float64)
    return float(np.corrcoef(order.astype(np.float64), positions)[0, 1])


def shards_per_batch(order: np.ndarray, per_shard: int, batch: int) -> float:
    usable = len(order) - len(order) % batch
    shard_ids = (order[:usable] // per_shard).reshape(-1, batch)
    return float(np.mean([len(np.unique(row)) for row in shard_ids]))


def measure(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    sizes = np.full(args.shards, args.per_shard)
    total = int(sizes.sum())
    rows = [("no shuffle", np.arange(total))]
    for parts, window in ((args.partitions, args.window), (args.partitions, args.window * 4)):
        spans = epoch_spans([stream_spans(0, sizes, total, args.seed, 0)], True, args.seed, 0)
        order = EpochOrder(spans, True, args.seed, 0, parts, window)
        concat = order.concat_positions(np.arange(total))
        _, shard, j = spans.locate(concat)
        rows.append((f"streamshards P={parts} window={window}", shard * args.per_shard + j))
    rows.append(("uniform random", np.random.default_rng(args.seed).permutation(total)))
    return [
        (name, spearman(o), shards_per_batch(o, args.per_shard, args.batch)) for name, o in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--window", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.shards} shards x {args.per_shard} samples, global batch {args.batch}")
    print(f"{'order':<40} {'spearman':>9} {'shards/batch':>13}")
    for name, rho, per_batch in measure(args):
        print(f"{name:<40} {rho:>9.4f} {per_batch:>13.1f}")


if __name__ == "__main__":
    main()
