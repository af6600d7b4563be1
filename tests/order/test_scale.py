"""O6 at scale: a 1,000,000,000-sample, 100,000-shard index starts and resumes at 90 %.

The shard files are hard links to one real 10,000-sample shard. A fresh process builds the
dataset, loads a state at 90 % of the epoch and reads the first batch; it reports seconds
and its peak memory above the interpreter with torch imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamshards import ShardWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from scale_index import link_index  # noqa: E402

SHARDS = 100_000
PER_SHARD = 10_000

PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    from streamshards import StreamingDataLoader, StreamingDataset
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    dataset = StreamingDataset(local=sys.argv[1], shuffle=True, seed=3, batch_size=256)
    built = time.perf_counter()
    loader = StreamingDataLoader(dataset)
    loader.load_state_dict(dataset.state_dict(dataset.epoch_size * 9 // 10))
    batch = next(iter(loader))
    done = time.perf_counter()
    start = dataset.epoch_size * 9 // 10
    _, shards, js = dataset.order(0).locate(np.arange(start, start + 256))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"build_s": built - started, "first_batch_s": done - built,
                      "extra_mb": (peak - base) / 1024, "ids": batch["id"].tolist(),
                      "expected": js.tolist(), "global": (shards * 10_000 + js).tolist(),
                      "open_shards": len(dataset._views), "samples": len(dataset)}))
    """
)


@pytest.mark.slow
def test_billion_sample_index_resumes_at_90_percent(tmp_path):
    real = tmp_path / "real"
    with ShardWriter(real, {"id": "int64"}, compression=None, size_limit="1GB") as writer:
        for i in range(PER_SHARD):
            writer.write({"id": i})
    data = link_index(real, tmp_path / "billion", SHARDS)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(data)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print({k: v for k, v in report.items() if k not in ("ids", "expected", "global")})
    assert report["samples"] == 1_000_000_000
    assert report["ids"] == report["expected"]
    assert len(set(report["global"])) == 256
    assert report["extra_mb"] < 1024, f"resume at scale used {report['extra_mb']:.0f} MB"
    assert report["open_shards"] <= 256, "resume opened shards it does not read"
