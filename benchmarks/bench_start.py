"""Start-up at scale: time and memory to the first batch, fresh and resumed at 90 %.

Indexes of 2,000 to 100,000 shards (5M to 5B samples) whose shard files are hard links to
one real shard (tools/scale_index.py). Each row runs in a fresh process, shuffled, batch 256:
building the dataset (reading and checking index.json), the first batch of an epoch, and
the first batch after loading a state at 90 % of the epoch. Memory is reported twice, above
an interpreter that has imported torch and streamshards: "anon MB", the process's own memory,
and "peak RSS MB", which also counts the page-cache pages of the shard files it mapped (each
shard read is verified by hashing all of it, so every shard a batch touches is mapped in
full; those pages are shared and reclaimable). The time baseline, measured in the same run,
is the import alone. Costs should grow with shards and not with samples.

    python benchmarks/bench_start.py [--shards 2000,20000,100000] [--plot start.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from scale_index import link_index  # noqa: E402

from streamshards import ShardWriter  # noqa: E402

PROBE = textwrap.dedent(
    """
    import json, sys, time
    from streamshards import StreamingDataLoader, StreamingDataset

    def status_mb(field):
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    base_peak, base_anon = status_mb("VmHWM"), status_mb("RssAnon")
    started = time.perf_counter()
    dataset = StreamingDataset(local=sys.argv[1], shuffle=True, seed=3, batch_size=256)
    built = time.perf_counter()
    next(iter(StreamingDataLoader(dataset)))
    first = time.perf_counter()
    resumed = StreamingDataLoader(dataset)
    resumed.load_state_dict(dataset.state_dict(dataset.epoch_size * 9 // 10))
    next(iter(resumed))
    done = time.perf_counter()
    print(json.dumps({"build": built - started, "first": first - built,
                      "resume": done - first, "shards_open": len(dataset._views),
                      "peak_mb": status_mb("VmHWM") - base_peak,
                      "anon_mb": status_mb("RssAnon") - base_anon}))
    """
)

# (name, columns, samples per real shard, one sample)
KINDS = {
    "tokens": ({"tokens": "ndarray:uint16:2048"}, 2_500, np.zeros(2048, np.uint16)),
    "ids": ({"id": "int64"}, 50_000, 0),
}


def import_seconds() -> float:
    """The baseline: a fresh interpreter importing torch and streamshards, nothing else."""
    started = time.perf_counter()
    code = "import torch, streamshards.dataset"
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def probe(folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="2000,20000,100000")
    parser.add_argument("--plot", help="write a PNG of seconds and MB against shards here")
    args = parser.parse_args()
    baseline = min(import_seconds() for _ in range(3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (columns, per_shard, value) in KINDS.items():
            real = Path(tmp) / f"{kind}-real"
            with ShardWriter(real, columns, compression=None, size_limit="1GB") as writer:
                name = next(iter(columns))
                for i in range(per_shard):
                    writer.write({name: value if kind == "tokens" else i})
            for shards in (int(s) for s in args.shards.split(",")):
                folder = link_index(real, Path(tmp) / f"{kind}-{shards}", shards)
                result = probe(folder)
                rows.append((kind, shards, shards * per_shard, result))
    print(f"baseline: a fresh interpreter importing torch and streamshards, {baseline:.2f} s")
    print(
        f"{'data':<7} {'shards':>8} {'samples':>15} {'build s':>8} {'first s':>8} "
        f"{'resume s':>9} {'open':>5} {'anon MB':>8} {'peak RSS MB':>12} {'time / import':>14}"
    )
    for kind, shards, samples, r in rows:
        total = r["build"] + r["first"]
        print(
            f"{kind:<7} {shards:>8,} {samples:>15,} {r['build']:>8.2f} {r['first']:>8.2f} "
            f"{r['resume']:>9.2f} {r['shards_open']:>5} {r['anon_mb']:>8.0f} "
            f"{r['peak_mb']:>12.0f} {total / baseline:>13.2f}x"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for kind in KINDS:
            mine = [r for r in rows if r[0] == kind]
            xs = [r[1] for r in mine]
            left.plot(xs, [r[3]["build"] + r[3]["first"] for r in mine], "o-", label=kind)
            right.plot(xs, [r[3]["anon_mb"] for r in mine], "o-", label=kind)
        left.set_xlabel("shards")
        left.set_ylabel("seconds to first batch")
        right.set_xlabel("shards")
        right.set_ylabel("process memory (anon MB) above import")
        left.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
