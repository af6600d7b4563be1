"""F2: sample i is found without scanning shards or samples; the package imports stay light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from core_helpers import text_samples, write_dataset

from streamshards import StreamingDataset, load_index
from streamshards.format import ShardError


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """150 samples, one per shard, of which only the last shard file is kept."""
    folder = tmp_path_factory.mktemp("many")
    write_dataset(folder, {"id": "int64", "text": "str"}, text_samples(150), size_limit=1)
    index = load_index(folder)
    assert len(index.shards) == 150
    for info in index.shards[:-1]:
        (folder / info.file).unlink()
    return folder


def test_random_access_opens_only_the_shard_holding_the_sample(many_shards: Path) -> None:
    """Opening the dataset touches no shard; ds[i] opens exactly the one that holds i."""
    ds = StreamingDataset(local=many_shards)
    assert len(ds) == 150 and len(ds._views) == 0
    assert ds[149] == text_samples(150)[149]
    assert len(ds._views) == 1
    with pytest.raises(ShardError, match=r"shard\.000000\.ssd\.zst: file .* is missing"):
        ds[0]


def test_out_of_range_ids_raise_index_error(many_shards: Path) -> None:
    ds = StreamingDataset(local=many_shards)
    for sample_id in (150, -1):
        with pytest.raises(IndexError, match="out of range"):
            ds[sample_id]


def test_import_does_not_pull_in_optional_dependencies() -> None:
    """`import streamshards` (and its CLI) must work without the s3/gcs/tokenize extras."""
    heavy = ["boto3", "botocore", "google.cloud", "tokenizers", "pyarrow", "ray"]
    code = (
        "import json, sys, streamshards, streamshards.cli, streamshards.convert.run; "
        f"print(json.dumps([m for m in sys.modules if m.startswith(tuple({heavy!r}))]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
