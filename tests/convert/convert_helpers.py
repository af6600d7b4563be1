"""Shared helpers for the convert tests: small corpora, running the command, reading results."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from click.testing import CliRunner

from streamshards import StreamingDataset
from streamshards.convert.cli import convert
from streamshards.index import INDEX_NAME

DATA = Path(__file__).resolve().parents[2] / "streamshards" / "data"
SAMPLE = DATA / "sotu-c4.json.gz"
TOKENIZER = DATA / "tokenizer.json"


def sample_docs(count: int | None = None) -> list[dict]:
    """The first ``count`` documents of the bundled corpus, as dicts."""
    docs = []
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            if count is not None and len(docs) == count:
                break
    return docs


def write_jsonl(path: Path, docs: list[dict], compress: str | None = None) -> Path:
    """Write documents as JSON lines, plain, gzip'd or zstd'd."""
    data = "".join(json.dumps(d) + "\n" for d in docs).encode("utf-8")
    if compress == "gzip":
        data = gzip.compress(data, mtime=0)
    elif compress == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def run_convert(*args: str, expect_ok: bool = True):
    """Run ``streamshards convert ARGS`` in this process; returns click's result."""
    result = CliRunner().invoke(convert, [str(a) for a in args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def samples(out: Path) -> list[dict]:
    """Every sample of a dataset, in order."""
    dataset = StreamingDataset(local=out)
    return [dataset[i] for i in range(len(dataset))]


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every file of a dataset (the index without its creation time), for byte comparisons."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != INDEX_NAME}
    index = json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))
    index["provenance"].pop("created")
    files[INDEX_NAME] = json.dumps(index, sort_keys=True).encode("utf-8")
    return files
