"""Build a dataset of any number of shards whose files are hard links to one real shard.

Scale tests and benchmarks use it to measure start-up, resume and memory at index sizes
(millions of shards, billions of samples) that would not fit on disk as real data.

    python tools/scale_index.py REAL_DATASET OUT --shards 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from streamshards import load_index
from streamshards.index import INDEX_NAME
from streamshards.verify import SETTLE_NS

LINKS_PER_FILE = 50_000  # file systems cap the links to one file (ext4: 65,000)


def link_index(real: Path, out: Path, shards: int) -> Path:
    """Write ``out``: ``shards`` copies of the single shard of dataset ``real``, by hard link."""
    template = load_index(real)
    if len(template.shards) != 1:
        raise ValueError(f"{real}: needs a dataset of exactly one shard")
    shard = template.shards[0]
    out.mkdir(parents=True)
    entry = shard.to_dict()
    entries = []
    for k in range(shards):
        if k % LINKS_PER_FILE == 0:
            source = out / f".source{k}"
            shutil.copyfile(real / shard.file, source)
            settled = time.time_ns() - 10 * SETTLE_NS  # at rest, as a dataset being read is:
            os.utime(source, ns=(settled, settled))  # the first read's stamp serves every link
        name = f"shard.{k:07d}.ssd" + (".zst" if shard.compression else "")
        os.link(source, out / name)
        entries.append({**entry, "file": name})
    for k in range(0, shards, LINKS_PER_FILE):
        (out / f".source{k}").unlink()  # the links keep the data
    index = {**template.to_dict(), "shards": entries, "num_samples": shards * shard.samples}
    (out / INDEX_NAME).write_text(json.dumps(index))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", type=Path, help="a dataset of one shard")
    parser.add_argument("out", type=Path)
    parser.add_argument("--shards", type=int, default=100_000)
    args = parser.parse_args()
    link_index(args.real, args.out, args.shards)
    print(f"{args.out}: {args.shards} shards")


if __name__ == "__main__":
    main()
