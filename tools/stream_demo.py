"""Stream a dataset for a few batches, save the loader state, and resume it in a new loader.

    python tools/stream_demo.py DATASET [--batch 8] [--steps 5] [--workers 2]

Prints the first sample ids of each batch, the saved state, and checks that the resumed loader
yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json

import torch

from streamshards import StreamingDataLoader, StreamingDataset


def _batches(loader: StreamingDataLoader, count: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            break
    return out


def _same(a: dict, b: dict) -> bool:
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    def loader() -> StreamingDataLoader:
        dataset = StreamingDataset(local=args.dataset, shuffle=True, seed=0, batch_size=args.batch)
        return StreamingDataLoader(dataset, num_workers=args.workers)

    reference = _batches(loader(), 2 * args.steps)
    first = loader()
    seen = _batches(first, args.steps)
    state = first.state_dict()
    print(f"read {len(seen)} batches of {args.batch}; state: {json.dumps(state)}")
    resumed = loader()
    resumed.load_state_dict(state)
    rest = _batches(resumed, args.steps)
    ok = all(_same(a, b) for a, b in zip(seen + rest, reference))
    print(f"resumed loader continues exactly: {ok}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
