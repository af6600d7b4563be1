"""Remote streaming and upload throughput against a local S3 server (moto), beside local reads.

Each row reads every shard of the same dataset once, in order, as the loader does: get the
local path (downloading into a cold cache for remote rows, with 1 or 4 parallel prefetch
downloads), verify and decompress it, touch the token array. The baseline is the same loop on
the local folder, measured in the same run. Upload rows publish the dataset with 1 and 8
parallel uploads. MB are stored (compressed) bytes.

    python benchmarks/bench_remote.py --shards 16 --shard-size 4MB [--plot out.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from streamshards import ShardWriter
from streamshards.reader import open_shard
from streamshards.sources import LocalSource, RemoteSource, ShardSource
from streamshards.transfer import upload
from streamshards.util import parse_size

SEQ = 2048


def make_dataset(folder: Path, shards: int, shard_bytes: int) -> Path:
    """Random token sequences (compress little, like real token ids), ``shards`` shards."""
    rng = np.random.default_rng(0)
    per_shard = max(1, shard_bytes // (2 * SEQ))
    with ShardWriter(folder, {"tokens": f"ndarray:uint16:{SEQ}"}, size_limit=shard_bytes) as w:
        for _ in range(shards * per_shard):
            w.write({"tokens": rng.integers(0, 50257, SEQ, dtype=np.uint16)})
    return folder


def start_s3_server() -> subprocess.Popen:
    """moto's S3 server in its own process, made the S3 endpoint through AWS_ENDPOINT_URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server


def read_all(source: ShardSource) -> tuple[float, float]:
    """(seconds, seconds waited in path) to read every shard once, prefetching the rest."""
    index = source.index
    column = list(index.columns).index("tokens")
    start = time.perf_counter()
    order = list(range(len(index.shards)))
    for k in order:
        source.prefetch(order[k + 1 :])
        view = open_shard(source.path(k), index.shards[k], index)
        int(view.fixed_array(column)[:, 0].sum())
        source.release(k)
    return time.perf_counter() - start, source.wait_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--shard-size", default="4MB")
    parser.add_argument("--plot", help="Write a bar chart of the MB/s column to this PNG.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    dataset = make_dataset(work / "data", args.shards, parse_size(args.shard_size))
    megabytes = LocalSource(dataset).index.stored_bytes / 1e6
    server = start_s3_server()
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        rows = []
        seconds, waited = read_all(LocalSource(dataset))
        rows.append(("local folder (baseline)", seconds, waited))
        for workers in (1, 8):
            report = upload(dataset, f"s3://bench/up{workers}", workers=workers, progress=False)
            rows.append((f"upload, {workers} parallel", report.seconds, None))
        for parallel in (1, 4):
            source = RemoteSource("s3://bench/up8", work / f"cache{parallel}", prefetch=parallel)
            seconds, waited = read_all(source)
            source.close()
            rows.append((f"S3 cold cache, {parallel} parallel", seconds, waited))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    print(f"dataset: {args.shards} shards, {megabytes:.1f} MB stored; S3 = moto on 127.0.0.1")
    print(f"{'scenario':<32} {'seconds':>8} {'MB/s':>8} {'vs local':>9} {'waited s':>9}")
    base = megabytes / rows[0][1]
    for name, seconds, waited in rows:
        rate = megabytes / seconds
        wait = "" if waited is None else f"{waited:.2f}"
        print(f"{name:<32} {seconds:>8.2f} {rate:>8.1f} {rate / base:>8.2f}x {wait:>9}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.barh([r[0] for r in rows][::-1], [megabytes / r[1] for r in rows][::-1])
        ax.set_xlabel("MB/s (stored bytes)")
        ax.set_title(f"streamshards remote I/O, {megabytes:.0f} MB dataset")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
