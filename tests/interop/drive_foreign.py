"""The order tests' process driver (tests/order/drive.py) over a foreign dataset.

Foreign fixtures carry no ``stream``/``id`` columns, so each sample is recorded by the
column named in INTEROP_KEY (an int, or a token row recorded by its hash); everything else,
the arguments, the dataset and the rank loop, is drive.py's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "order"))
import drive  # noqa: E402

from streamshards import StreamingDataLoader  # noqa: E402


def key(value) -> int:
    """A sample's identity: its integer id, or the hash of its token row."""
    row = np.asarray(value)
    return xxhash.xxh3_64_intdigest(row.tobytes()) if row.ndim else int(row)


def run_rank(args: argparse.Namespace, rank: int, workers: int) -> dict:
    """drive.run_rank, recording each sample by INTEROP_KEY's column."""
    column = os.environ["INTEROP_KEY"]
    loader = StreamingDataLoader(drive.build(args), num_workers=workers)
    if args.state_in:
        loader.load_state_dict(drive.json.loads(Path(args.state_in).read_text()))
    batches = []
    for _ in range(args.epochs):
        for batch in loader:
            batches.append([[0, key(v)] for v in batch[column]])
            if args.steps is not None and len(batches) == args.steps:
                return {"batches": batches, "state": loader.state_dict()}
    return {"batches": batches, "state": loader.state_dict()}


if __name__ == "__main__":
    drive.run_rank = run_rank
    drive.main()
