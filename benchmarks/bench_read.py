"""Read throughput: one epoch of packed token sequences and of raw text.

Each row is one epoch, in-process (``iter_batches``) or through ``StreamingDataLoader`` with
0, 1 or 2 workers, shuffled or not, printed beside the limits measured in the same run:
numpy copying the same shard bytes out of a memory map, and (compressed text) zstd alone,
on one thread and on as many threads as an in-process reader decompresses ahead on. Text
also gets UTF-8 decoding alone (what every text read adds once its bytes are in memory) and a
pickle round trip of the decoded samples (the floor of handing them to another process).
Compressed text also gets two overlap floors: zstd decompressing every shard on the reader's
threads while the main thread, at the same time and waiting on nothing, either reads the same
documents stored uncompressed ("overlap: reader", this reader's per-sample work) or only
decodes their UTF-8 in the epoch's order ("overlap: decode only", the least any reader handing
out ``str`` does): the fastest an in-process epoch could be on this machine.
Every row is the fastest of ``--repeat`` runs, the one least disturbed by other work. A
first epoch also hashes every shard before use (the "xxh3 verify alone" row); a second epoch
of the same dataset finds its shards open and verified, as most of a long run does.

"text" is zstd-compressed, "text-raw" the same documents stored uncompressed.

    python benchmarks/bench_read.py --tokens-mb 256 --text-mb 128 --plot read.png
"""

from __future__ import annotations

import argparse
import mmap
import pickle
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from streamshards import ShardWriter, StreamingDataLoader, StreamingDataset, load_index
from streamshards.ahead import usable_cores
from streamshards.dataset import AHEAD_THREADS
from streamshards.format import stored_hash
from streamshards.loader import RUN_SAMPLES
from streamshards.reader import open_shard

SEQ = 2048


def make_tokens(folder: Path, megabytes: int) -> None:
    rng = np.random.default_rng(0)
    count = megabytes * 10**6 // (SEQ * 2)
    with ShardWriter(folder, {"tokens": f"ndarray:uint16:{SEQ}"}, compression=None) as writer:
        block = rng.integers(0, 50000, (1024, SEQ), dtype=np.uint16)
        for i in range(count):
            writer.write({"tokens": block[i % 1024]})


def make_text(
    folder: Path, megabytes: int, compression: str | None = "zstd", shard_mb: int = 64
) -> None:
    rng = np.random.default_rng(1)
    words = [f"w{i}" * (1 + i % 3) for i in range(5000)]
    written = 0
    limit = shard_mb * 10**6
    with ShardWriter(folder, {"text": "str"}, compression=compression, size_limit=limit) as writer:
        while written < megabytes * 10**6:
            # C4-like lengths: a log-normal around 400 words, about 2 KB a document
            length = int(min(20000, max(5, rng.lognormal(5.3, 0.9))))
            text = " ".join(rng.choice(words, size=length))
            writer.write({"text": text})
            written += len(text)


def time_mapped(folder: Path, work) -> float:
    """Seconds for ``work(memory map)`` over every shard file of a dataset."""
    index = load_index(folder)
    started = time.perf_counter()
    for info in index.shards:
        with (
            open(folder / info.file, "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
        ):
            work(m)
    return time.perf_counter() - started


def copy_out(m: mmap.mmap) -> None:
    """Copy a mapping's bytes out with numpy, 4 MiB at a time: the limit of any read."""
    view = np.frombuffer(m, dtype=np.uint8)
    for lo in range(0, len(view), 1 << 22):
        np.array(view[lo : lo + (1 << 22)])
    del view


def mmap_limit(folder: Path) -> float:
    """Seconds for numpy to copy every shard's stored bytes out of a memory map."""
    return time_mapped(folder, copy_out)


def verify_time(folder: Path) -> float:
    """Seconds to hash every shard as a first read must (xxh3 over the stored bytes)."""
    return time_mapped(folder, stored_hash)


def stored_blobs(folder: Path) -> list[bytes]:
    """Every shard file's stored bytes, read into memory so that timings exclude the disk."""
    return [(folder / info.file).read_bytes() for info in load_index(folder).shards]


def zstd_limit(folder: Path, threads: int = 1) -> float:
    """Seconds for zstd alone to decompress every shard on ``threads`` threads (the floor for
    compressed text; an in-process reader decompresses on AHEAD_THREADS)."""
    import zstandard

    blobs = stored_blobs(folder)
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(lambda blob: zstandard.ZstdDecompressor().decompress(blob), blobs))
        return time.perf_counter() - started


def encoded_samples(folder: Path) -> list[bytes]:
    """Every sample's stored text bytes, in stored order (so in memory in that order too)."""
    index = load_index(folder)
    encoded = []
    for info in index.shards:
        view = open_shard(folder / info.file, info, index)
        encoded.extend(view.encoded(j)[0] for j in range(view.num_samples))  # the text column
    return encoded


def decode_limit(folder: Path) -> float:
    """Seconds to make every sample's ``str`` from its UTF-8 bytes, already in memory: the
    work left to any text read that hands out ``str``, whatever it stores or decompresses."""
    encoded = encoded_samples(folder)
    started = time.perf_counter()
    for blob in encoded:
        blob.decode()
    return time.perf_counter() - started


def pickle_limit(folder: Path, batch: int) -> float:
    """Seconds to pickle and unpickle every sample's decoded columns, in runs of about
    ``RUN_SAMPLES``: the floor of handing decoded samples across a process boundary."""
    dataset = StreamingDataset(local=folder, batch_size=batch)
    runs = list(dataset.iter_batches(join=max(1, RUN_SAMPLES // batch)))
    started = time.perf_counter()
    for run in runs:
        pickle.loads(pickle.dumps(run, protocol=pickle.HIGHEST_PROTOCOL))
    return time.perf_counter() - started


def epoch(
    folder: Path, shuffle: bool, workers: int | None, batch: int, warm: bool = False
) -> tuple[float, int, float]:
    """(seconds, samples, seconds to the first batch) for one epoch; ``workers=None`` reads
    in-process, no DataLoader.

    ``warm`` times a dataset's second epoch: its shards are then open and verified, as they
    are for most of a long run.
    """
    dataset = StreamingDataset(local=folder, shuffle=shuffle, seed=1, batch_size=batch)
    if warm:
        for _ in dataset.iter_batches():
            pass
    started = time.perf_counter()
    samples = 0
    first = None
    batches = dataset.iter_batches() if workers is None else StreamingDataLoader(dataset, workers)
    for item in batches:
        samples += len(next(iter(item.values())))
        first = first or time.perf_counter() - started
    return time.perf_counter() - started, samples, first or 0.0


def reader_epoch(folder: Path, shuffle: bool, batch: int) -> Callable[[], None]:
    """A second in-process epoch of ``folder``: every per-sample step of the reader, with its
    shards already open."""
    dataset = StreamingDataset(local=folder, shuffle=shuffle, seed=1, batch_size=batch)
    for _ in dataset.iter_batches():
        pass

    def read() -> None:
        for _ in dataset.iter_batches():
            pass

    return read


def decode_epoch(folder: Path, shuffle: bool, batch: int) -> Callable[[], None]:
    """UTF-8 decoding of every sample of ``folder`` in the epoch's order, from bytes held in
    memory in stored order: the least per-sample work any reader handing out ``str`` does."""
    dataset = StreamingDataset(local=folder, shuffle=shuffle, seed=1, batch_size=batch)
    _, shards, rows = dataset.order(0).locate(np.arange(len(dataset)))
    encoded = encoded_samples(folder)
    order = (dataset.sources[0].index.shard_starts[shards] + rows).tolist()

    def decode() -> None:
        for k in order:
            encoded[k].decode()

    return decode


def overlap_limit(compressed: Path, work: Callable[[], None]) -> float:
    """Seconds for the shards of ``compressed`` to be hashed and decompressed on the reader's
    threads while this thread runs ``work`` on the same documents, all at once with nothing
    waiting: the fastest an in-process epoch doing that work could be here. Measured, not
    summed, since the threads and this one share cores, caches and memory bandwidth."""
    import zstandard

    blobs = stored_blobs(compressed)

    def unpack(blob: bytes) -> bytes:
        stored_hash(blob)
        return zstandard.ZstdDecompressor().decompress(blob)

    with ThreadPoolExecutor(min(AHEAD_THREADS, usable_cores())) as pool:
        started = time.perf_counter()
        unpacked = [pool.submit(unpack, blob) for blob in blobs]
        work()
        for future in unpacked:
            future.result()
        return time.perf_counter() - started


# row label: (workers, warm) as ``epoch`` takes them
MODES = {
    "in-process": (None, False),
    "in-process, 2nd epoch": (None, True),
    "loader, 0 workers": (0, False),
    "loader, 1 workers": (1, False),
    "loader, 2 workers": (2, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-mb", type=int, default=256)
    parser.add_argument("--text-mb", type=int, default=128)
    parser.add_argument("--text-shard-mb", type=int, default=64, help="raw MB per text shard")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest counts")
    parser.add_argument("--plot", help="write a bar chart PNG here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, size in (
            ("tokens", make_tokens, args.tokens_mb),
            ("text", partial(make_text, shard_mb=args.text_shard_mb), args.text_mb),
            (
                "text-raw",
                partial(make_text, compression=None, shard_mb=args.text_shard_mb),
                args.text_mb,
            ),
        ):
            folder = Path(tmp) / name
            make(folder, size)
            index = load_index(folder)
            raw_mb = index.raw_bytes / 1e6
            epoch(folder, False, None, args.batch)  # warm the page cache
            limit = min(mmap_limit(folder) for _ in range(args.repeat))
            rows.append(
                (
                    name,
                    "mmap copy (limit)",
                    "-",
                    index.num_samples / limit,
                    index.stored_bytes / 1e6 / limit,
                    None,
                )
            )
            verify = min(verify_time(folder) for _ in range(args.repeat))
            rate = index.num_samples / verify
            rows.append(
                (name, "xxh3 verify alone", "=", rate, index.stored_bytes / 1e6 / verify, None)
            )
            if index.shards[0].compression:
                unzstd = min(zstd_limit(folder) for _ in range(args.repeat))
                rate = index.num_samples / unzstd
                rows.append((name, "zstd alone (limit)", "+", rate, raw_mb / unzstd, None))
                threads = min(AHEAD_THREADS, usable_cores())
                unzstd = min(zstd_limit(folder, threads) for _ in range(args.repeat))
                rate = index.num_samples / unzstd
                how = f"zstd alone, {threads} thr"
                rows.append((name, how, "+", rate, raw_mb / unzstd, None))
            if name != "tokens":  # token batches cross processes as shared-memory tensors
                decode = min(decode_limit(folder) for _ in range(args.repeat))
                rate = index.num_samples / decode
                rows.append((name, "utf-8 decode alone", "=", rate, raw_mb / decode, None))
                ipc = min(pickle_limit(folder, args.batch) for _ in range(args.repeat))
                rate = index.num_samples / ipc
                rows.append((name, "pickle round trip", "=", rate, raw_mb / ipc, None))
            for shuffle in (False, True):
                for how, (workers, warm) in MODES.items():
                    runs = [
                        epoch(folder, shuffle, workers, args.batch, warm)
                        for _ in range(args.repeat)
                    ]
                    assert all(samples == index.num_samples for _, samples, _ in runs)
                    seconds = min(t for t, _, _ in runs)  # the run least disturbed by other work
                    first = min(f for _, _, f in runs)
                    rate = index.num_samples / seconds
                    rows.append(
                        (name, how, "on" if shuffle else "off", rate, raw_mb / seconds, first)
                    )
        text, raw = Path(tmp) / "text", Path(tmp) / "text-raw"
        index = load_index(text)
        samples, raw_mb = index.num_samples, index.raw_bytes / 1e6
        for how, work in (
            ("overlap: reader", reader_epoch),
            ("overlap: decode only", decode_epoch),
        ):
            for shuffle in (False, True):
                floor = min(
                    overlap_limit(text, work(raw, shuffle, args.batch)) for _ in range(args.repeat)
                )
                flag = "on" if shuffle else "off"
                rows.append(("text", how, flag, samples / floor, raw_mb / floor, None))
    print(
        f"{'data':<9} {'how':<22} {'shuffle':<8} {'samples/s':>12} {'MB/s':>9} {'of limit':>9} "
        f"{'1st batch s':>12}"
    )
    print("(of limit: against the tightest limit row of the same data)")
    limits = {r[0]: r[3] for r in rows if r[2] in ("-", "+")}
    for data, how, shuffle, rate, mbps, first in rows:
        first_text = "" if first is None else f"{first:.3f}"
        print(
            f"{data:<9} {how:<22} {shuffle:<8} {rate:>12,.0f} {mbps:>9,.0f} "
            f"{rate / limits[data]:>8.0%} {first_text:>12}"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 5))
        labels = [f"{d} {h} {s}" for d, h, s, _, _, _ in rows]
        ax.barh(labels, [r[3] for r in rows])
        ax.set_xlabel("samples/s")
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
