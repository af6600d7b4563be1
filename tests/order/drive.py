"""Runs StreamingDataLoader for given ranks in a real process and writes what each rank saw.

Ranks come from RANK/WORLD_SIZE set per job (or from torch.distributed with --dist), so one
process can play several ranks in turn; DataLoader workers are real processes.
Output JSON: {"runs": {workers: {rank: {"batches": [[[stream, id], ...], ...], "state": ...}}}}.
"""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from streamshards import Stream, StreamingDataLoader, StreamingDataset


def build(args: argparse.Namespace) -> StreamingDataset:
    options = dict(
        shuffle=not args.no_shuffle,
        seed=args.seed,
        batch_size=args.batch,
        drop_last=args.drop_last,
        num_partitions=args.partitions,
        shuffle_window=args.window,
    )
    if args.streams:
        streams = [Stream(**spec) for spec in json.loads(args.streams)]
        return StreamingDataset(streams=streams, epoch_size=args.epoch_size, **options)
    return StreamingDataset(local=args.data, **options)


def run_rank(args: argparse.Namespace, rank: int, workers: int) -> dict:
    dataset = build(args)
    loader = StreamingDataLoader(dataset, num_workers=workers)
    if args.state_in:
        with open(args.state_in) as f:
            loader.load_state_dict(json.load(f))
    batches = []
    state = None
    for _ in range(args.epochs):
        for batch in loader:
            batches.append([[int(s), int(i)] for s, i in zip(batch["stream"], batch["id"])])
            if args.steps is not None and len(batches) == args.steps:
                state = loader.state_dict()
                return {"batches": batches, "state": state}
    return {"batches": batches, "state": loader.state_dict()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data")
    parser.add_argument("--streams", help="JSON list of Stream keyword arguments")
    parser.add_argument("--epoch-size", type=int)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--ranks", default=None, help="comma-separated; default all")
    parser.add_argument("--workers", default="0", help="comma-separated worker counts to run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--drop-last", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--state-in")
    parser.add_argument("--dist", action="store_true", help="use torch.distributed (gloo)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    results: dict[int, dict[int, dict]] = {}
    worker_counts = [int(w) for w in args.workers.split(",")]
    out = args.out
    if args.dist:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        for workers in worker_counts:
            results.setdefault(workers, {})[rank] = run_rank(args, rank, workers)
        dist.barrier()
        out = f"{args.out}.rank{rank}"
        dist.destroy_process_group()
    else:
        ranks = range(args.world) if args.ranks is None else [int(r) for r in args.ranks.split(",")]
        for workers in worker_counts:
            for rank in ranks:
                os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(args.world)
                results.setdefault(workers, {})[rank] = run_rank(args, rank, workers)
    with open(out, "w") as f:
        json.dump({"runs": results}, f)


if __name__ == "__main__":
    main()
