"""Time to the first batch after resuming at 0, 10, 50 and 90 % of an epoch.

streamshards loads a state and jumps to the position; the baseline is what loaders without
mid-epoch resume do: iterate from the start and throw batches away until the step.

    python benchmarks/bench_resume.py --sequences 40000 --plot resume.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from streamshards import ShardWriter, StreamingDataLoader, StreamingDataset

SEQ = 2048


def make_tokens(folder: Path, sequences: int) -> None:
    block = np.random.default_rng(0).integers(0, 50000, (512, SEQ), dtype=np.uint16)
    with ShardWriter(folder, {"tokens": f"ndarray:uint16:{SEQ}"}, compression=None) as writer:
        for i in range(sequences):
            writer.write({"tokens": block[i % 512]})


def resume(folder: Path, step: int, batch: int) -> float:
    started = time.perf_counter()
    dataset = StreamingDataset(local=folder, shuffle=True, seed=1, batch_size=batch)
    loader = StreamingDataLoader(dataset)
    loader.load_state_dict(dataset.state_dict(step * batch))
    next(iter(loader))
    return time.perf_counter() - started


def fast_forward(folder: Path, step: int, batch: int) -> float:
    started = time.perf_counter()
    dataset = StreamingDataset(local=folder, shuffle=True, seed=1, batch_size=batch)
    batches = iter(StreamingDataLoader(dataset))
    for _ in range(step + 1):
        next(batches)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=40000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--plot", help="write a PNG of both curves here")
    args = parser.parse_args()
    steps_per_epoch = args.sequences // args.batch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tokens"
        make_tokens(folder, args.sequences)
        resume(folder, 0, args.batch)  # warm the page cache
        for fraction in (0.0, 0.1, 0.5, 0.9):
            step = int(steps_per_epoch * fraction)
            jump = min(resume(folder, step, args.batch) for _ in range(3))
            skip = fast_forward(folder, step, args.batch)
            rows.append((fraction, step, jump, skip))
    print(f"{args.sequences} sequences of {SEQ} tokens, batch {args.batch}")
    print(f"{'at':>5} {'step':>7} {'resume s':>9} {'fast-forward s':>15} {'speed-up':>9}")
    for fraction, step, jump, skip in rows:
        print(f"{fraction:>5.0%} {step:>7} {jump:>9.4f} {skip:>15.4f} {skip / jump:>8.1f}x")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r[1] for r in rows], [r[2] for r in rows], "o-", label="streamshards resume")
        ax.plot([r[1] for r in rows], [r[3] for r in rows], "s-", label="fast-forward")
        ax.set_xlabel("step resumed at")
        ax.set_ylabel("seconds to first batch")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
