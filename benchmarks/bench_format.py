"""Shard format speed beside the physical limits measured in the same run.

For two workloads (packed token sequences, ``ndarray:uint16:2048``; raw text, ~2 KB strings)
it measures, for shards without compression and with zstd:

- write throughput (MB/s of raw sample bytes), beside a plain file write + fsync of the same
  bytes and beside zstd alone compressing the same bytes;
- random access (``ds[i]`` on random i, shards already open), beside numpy reading the same
  sample from a memory map of the same bytes;
- sequential reading (per-sample iteration and batches of 256), beside numpy copying the same
  bytes out of a memory map and beside zstd alone decompressing the same shards.

Files are read from the page cache (just written): this measures the format, not the disk.

    python benchmarks/bench_format.py --size-mb 64 --plot bench_format.png
"""

from __future__ import annotations

import argparse
import gzip
import json
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from streamshards import ShardWriter, StreamingDataset, load_index

CORPUS = Path(__file__).resolve().parent.parent / "streamshards" / "data" / "sotu-c4.json.gz"
MB = 1e6


def token_samples(size_mb: float, seed: int = 0) -> list[np.ndarray]:
    """Rows of 2048 token ids with a Zipf-like frequency, as real token streams have."""
    rng = np.random.default_rng(seed)
    rows = max(1, int(size_mb * MB) // 4096)
    ids = (rng.zipf(1.2, size=rows * 2048) - 1) % 50257
    return list(ids.astype(np.uint16).reshape(rows, 2048))


def text_samples(size_mb: float, seed: int = 0) -> list[str]:
    """English text cut into pieces of 1.5-2.5 KB, cycling through the bundled corpus."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        corpus = " ".join(json.loads(line)["text"] for line in f)
    rng = np.random.default_rng(seed)
    pieces, total, start = [], 0, 0
    while total < size_mb * MB:
        length = int(rng.integers(1500, 2500))
        if start + length > len(corpus):
            start = int(rng.integers(0, 1000))
        piece = corpus[start : start + length]
        pieces.append(piece)
        total += len(piece.encode("utf-8"))
        start += length
    return pieces


def timed(action: Callable[[], object], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs of ``action``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def write(folder: Path, column: str, values: list, compression: str | None, shard_mb: int):
    def run() -> None:
        with ShardWriter(
            folder, {"x": column}, compression, f"{shard_mb}MB", overwrite=True
        ) as writer:
            for value in values:
                writer.write({"x": value})

    return timed(run)


def file_write_seconds(path: Path, blob: bytes) -> float:
    def run() -> None:
        with open(path, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    return timed(run, 2)


def zstd_seconds(chunks: list[bytes], level: int) -> tuple[float, float]:
    """Seconds for zstd alone to compress, then to decompress, the same chunks."""
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    frames = [compressor.compress(chunk) for chunk in chunks]
    decompressor = zstandard.ZstdDecompressor()
    squeeze = timed(lambda: [compressor.compress(chunk) for chunk in chunks], 2)
    expand = timed(lambda: [decompressor.decompress(frame) for frame in frames], 2)
    return squeeze, expand


def chunked(blob: bytes, size: int) -> list[bytes]:
    return [blob[k : k + size] for k in range(0, len(blob), size)]


def mmap_baselines(path: Path, lengths: np.ndarray, ids: list[int], is_text: bool):
    """(seconds per random read, seconds to copy all bytes) with numpy over a memory map."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = np.frombuffer(mapped, dtype=np.uint8)
    if is_text:
        ends = np.cumsum(lengths)
        starts = ends - lengths
        view = memoryview(mapped)

        def read_random() -> None:
            for i in ids:
                str(view[int(starts[i]) : int(ends[i])], "utf-8")

    else:
        rows = buf.view(np.uint16).reshape(len(lengths), -1)

        def read_random() -> None:
            for i in ids:
                rows[i]

    out = np.empty(min(len(buf), 1 << 24), dtype=np.uint8)

    def read_all() -> None:
        for k in range(0, len(buf), len(out)):
            part = buf[k : k + len(out)]
            np.copyto(out[: len(part)], part)

    return timed(read_random, 3) / len(ids), timed(read_all, 3)


def dataset_reads(folder: Path, ids: list[int]) -> tuple[float, float, float]:
    """(seconds per ds[i], seconds to iterate all samples, seconds to iterate batches of 256)."""
    ds = StreamingDataset(local=folder)
    for i in range(0, len(ds), max(1, len(ds) // 64)):
        ds[i]

    def read_random() -> None:
        for i in ids:
            ds[i]

    def read_samples() -> None:
        for _ in StreamingDataset(local=folder):
            pass

    def read_batches() -> None:
        for _ in StreamingDataset(local=folder, batch_size=256).iter_batches():
            pass

    return timed(read_random, 3) / len(ids), timed(read_samples), timed(read_batches)


@dataclass
class Row:
    """One measurement beside the physical limit measured for it in the same run."""

    workload: str
    measure: str
    value: float
    limit_name: str
    limit: float
    unit: str


def run_workload(name: str, column: str, values: list, args, tmp: Path) -> list[Row]:
    """Write and read one workload with and without zstd, and measure its limits."""
    is_text = column == "str"
    encoded = [v.encode("utf-8") if is_text else v.tobytes() for v in values]
    blob = b"".join(encoded)
    raw_mb = len(blob) / MB
    ids = [int(i) for i in np.random.default_rng(1).integers(0, len(values), args.reads)]
    plain_file = tmp / f"{name}.raw"
    file_seconds = file_write_seconds(plain_file, blob)
    zstd_write, zstd_read = zstd_seconds(chunked(blob, args.shard_mb * 10**6), 3)
    lengths = np.array([len(e) for e in encoded])
    mm_random, mm_sequential = mmap_baselines(plain_file, lengths, ids, is_text)
    limits = {
        None: (("file write+fsync", file_seconds), ("numpy memmap copy", mm_sequential)),
        "zstd": (("zstd:3 alone", zstd_write), ("zstd alone", zstd_read)),
    }
    rows = []
    for compression, ((write_name, write_s), (read_name, read_s)) in limits.items():
        label = compression or "none"
        folder = tmp / f"{name}-{label}"
        seconds = write(folder, column, values, compression, args.shard_mb)
        index = load_index(folder)
        ratio = index.raw_bytes / index.stored_bytes
        random_s, samples_s, batches_s = dataset_reads(folder, ids)
        rows += [
            Row(
                name,
                f"write, {label} (ratio {ratio:.2f})",
                raw_mb / seconds,
                write_name,
                raw_mb / write_s,
                "MB/s",
            ),
            Row(
                name,
                f"ds[i] random, {label}",
                1 / random_s,
                "numpy memmap",
                1 / mm_random,
                "reads/s",
            ),
            Row(
                name,
                f"iterate samples, {label}",
                raw_mb / samples_s,
                read_name,
                raw_mb / read_s,
                "MB/s",
            ),
            Row(
                name,
                f"iterate batches of 256, {label}",
                raw_mb / batches_s,
                read_name,
                raw_mb / read_s,
                "MB/s",
            ),
        ]
        print(
            f"{name:7s} {label:5s} {random_s * 1e6:6.2f} us per ds[i] "
            f"({mm_random * 1e6:.2f} us numpy memmap)",
            flush=True,
        )
    return rows


def print_table(rows: list[Row]) -> None:
    print()
    print(
        f"{'workload':8s} {'measure':34s} {'streamshards':>17s} "
        f"{'limit (same run)':>28s} {'of limit':>8s}"
    )
    for r in rows:
        print(
            f"{r.workload:8s} {r.measure:34s} {r.value:>9,.0f} {r.unit:7s} "
            f"{r.limit_name:>18s} {r.limit:>9,.0f} {r.value / r.limit:>8.0%}"
        )


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1))
    y = np.arange(len(rows))
    ax.barh(y, [r.value / r.limit for r in rows], 0.6, label="streamshards / limit")
    ax.axvline(1.0, color="gray", linestyle="--", label="limit measured in the same run")
    ax.set_yticks(y, [f"{r.workload}: {r.measure}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the physical limit (log scale)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=64, help="raw MB per workload")
    parser.add_argument("--shard-mb", type=int, default=16, help="shard size limit in MB")
    parser.add_argument("--reads", type=int, default=100_000, help="random reads to time")
    parser.add_argument("--plot", help="write a PNG of the table here")
    parser.add_argument("--dir", help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        tmp = Path(scratch)
        rows = run_workload("tokens", "ndarray:uint16:2048", token_samples(args.size_mb), args, tmp)
        rows += run_workload("text", "str", text_samples(args.size_mb), args, tmp)
    print_table(rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
