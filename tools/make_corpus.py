"""Write C4-format corpora of any size for benchmarks: gzip'd JSON lines (text, timestamp, url).

Documents are sentences of the bundled sample corpus (public-domain State of the Union text)
drawn at random, grouped into paragraphs; their lengths follow a log-normal like C4's
(median about 400 words, long tail, capped at 20,000 words). The same seed gives the same bytes.

    python tools/make_corpus.py bench-data/ --size 200MB --files 4
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "streamshards" / "data" / "sotu-c4.json.gz"
MEDIAN_WORDS = 360  # paragraphs overshoot the target: the median lands near 400
SIGMA = 1.0
MAX_WORDS = 20_000


def sentences() -> list[str]:
    """Every sentence of the sample corpus, in order."""
    out = []
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            out.extend(s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 3)
    return out


def document(rng: random.Random, pool: list[str]) -> str:
    """One document: paragraphs of 1-6 random sentences, about a C4-like number of words."""
    target = min(MAX_WORDS, max(20, int(rng.lognormvariate(math.log(MEDIAN_WORDS), SIGMA))))
    paragraphs, words = [], 0
    while words < target:
        paragraph = " ".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))
        paragraphs.append(paragraph)
        words += paragraph.count(" ") + 1
    return "\n".join(paragraphs)


def write_corpus(folder: str | Path, size: int, files: int = 1, seed: int = 0) -> list[Path]:
    """Write ``files`` files of about ``size`` uncompressed bytes in all; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = sentences()
    paths = []
    for k in range(files):
        path = folder / f"c4-train.{k:05d}-of-{files:05d}.json.gz"
        written = 0
        with open(path, "wb") as raw, gzip.GzipFile("", "wb", 6, raw, mtime=0) as f:
            number = 0
            while written < size // files:
                record = {
                    "text": document(rng, pool),
                    "timestamp": f"2019-04-{1 + number % 28:02d}T12:00:00Z",
                    "url": f"https://example.org/{k}/{number}",
                }
                line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
                data = line.encode("utf-8")
                f.write(data)
                written += len(data)
                number += 1
        paths.append(path)
    return paths


def main() -> None:
    from streamshards.util import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--size", default="100MB", help="Uncompressed bytes in all (e.g. 1GB).")
    parser.add_argument("--files", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_corpus(args.folder, parse_size(args.size), args.files, args.seed):
        print(f"{path} {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
