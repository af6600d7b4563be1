"""Reading MDS in place vs a native copy, and convert throughput vs copying the files.

The uncompressed MDS fixtures written by MosaicML Streaming (``mds_text``: text, url, int;
``mds_tokens_int32``: LLM Foundry token rows) are scaled to ``--mb`` megabytes by listing
their shard files many times over (copied byte for byte, so their recorded hashes hold). Each
is read for one epoch in-process (``iter_batches``) through streamshards' MDS reader, and
through a native, uncompressed copy of it with shards of the same byte limit (fewer shards
when convert narrows token rows to uint16), and through one with as many samples a shard as
the MDS shards; a second epoch finds the shards open and verified (up to the dataset's limit
of open shards). Then ``convert_foreign`` into native shards is timed beside
``shutil.copytree`` of the same folder. Every row is the fastest of ``--repeat`` runs.

    python benchmarks/bench_interop.py --mb 200
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from streamshards import StreamingDataset
from streamshards.interop.convert import convert_foreign

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "interop"


def scale(name: str, folder: Path, megabytes: float) -> int:
    """An MDS folder of about ``megabytes`` MB: the fixture's shards listed again and again."""
    source = FIXTURES / name / "data"
    index = json.loads((source / "index.json").read_text())
    size = sum(s["raw_data"]["bytes"] for s in index["shards"])
    copies = max(1, math.ceil(megabytes * 10**6 / size))
    folder.mkdir(parents=True)
    shards = []
    for _ in range(copies):
        for entry in index["shards"]:
            entry = json.loads(json.dumps(entry))
            name_out = f"shard.{len(shards):06d}.mds"
            shutil.copyfile(source / entry["raw_data"]["basename"], folder / name_out)
            entry["raw_data"]["basename"] = name_out
            shards.append(entry)
    (folder / "index.json").write_text(json.dumps({"shards": shards, "version": 2}))
    return size * copies


def best(repeat: int, work) -> float:
    """The fastest of ``repeat`` runs of ``work()``, in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def epoch(dataset: StreamingDataset) -> None:
    for _ in dataset.iter_batches():
        pass


def bench(name: str, tmp: Path, args: argparse.Namespace) -> None:
    """Print the read and convert rows of one scaled fixture."""
    mds = tmp / name
    size = scale(name, mds, args.mb)
    shard_bytes = json.loads((mds / "index.json").read_text())["shards"][0]["size_limit"]
    native = tmp / f"{name}-native"
    convert_foreign(str(mds), native, compression=None, size_limit=shard_bytes)
    # The native copy may be smaller (token rows narrowed to uint16), so at the same byte
    # limit it has fewer shards; a second copy holds as many samples a shard as the MDS one.
    written = sum(p.stat().st_size for p in native.iterdir() if p.name != "index.json")
    same = tmp / f"{name}-native-same-shards"
    convert_foreign(str(mds), same, compression=None, size_limit=int(shard_bytes * written / size))
    counts = {
        f: len(StreamingDataset(local=str(f)).sources[0].index.shards) for f in (native, same, mds)
    }
    print(
        f"{name:<18} shards: MDS {counts[mds]}, native copy {counts[native]}, "
        f"same shard count {counts[same]}"
    )

    def row(label: str, seconds: float, baseline: float | None) -> None:
        ratio = f"{baseline / seconds:.0%}" if baseline else "baseline"
        rate = size / seconds / 1e6
        print(f"{name:<18} {label:<40} {seconds:8.3f} {rate:9.1f} {ratio:>12}")

    def fresh(folder: Path) -> None:
        epoch(StreamingDataset(local=str(folder), batch_size=args.batch))

    folders = (native, same, mds)
    opened = {f: StreamingDataset(local=str(f), batch_size=args.batch) for f in folders}
    for which in ("first", "second"):
        times = {}
        for folder in folders:
            if which == "first":
                times[folder] = best(args.repeat, lambda f=folder: fresh(f))
            else:
                epoch(opened[folder])
                times[folder] = best(args.repeat, lambda d=opened[folder]: epoch(d))
        row(f"read, {which} epoch: native copy", times[native], None)
        row(f"read, {which} epoch: MDS in place", times[mds], times[native])
        row(f"read, {which}: native, same shard count", times[same], None)
        row(f"read, {which}: MDS vs same shard count", times[mds], times[same])

    copied = tmp / f"{name}-copy"
    out = tmp / f"{name}-out"

    def copy() -> None:
        shutil.rmtree(copied, ignore_errors=True)
        shutil.copytree(mds, copied)

    def convert() -> None:
        convert_foreign(str(mds), out, compression=None, overwrite=True)

    copy_time = best(args.repeat, copy)
    row("copy the files (shutil.copytree)", copy_time, None)
    row("convert to native, uncompressed", best(args.repeat, convert), copy_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200, help="MB of each scaled dataset")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'dataset':<18} {'row':<40} {'seconds':>8} {'MB/s':>9} {'vs baseline':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mds_text", "mds_tokens_int32"):
            bench(name, Path(tmp), args)


if __name__ == "__main__":
    main()
