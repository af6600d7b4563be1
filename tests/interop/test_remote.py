"""MDS and LitData datasets on S3 stream through the node cache, verified by their own hashes."""

from __future__ import annotations

import pytest
from interop_helpers import FIXTURES, comparable, expected, expected_samples, options

from streamshards import Stream, StreamingDataset
from streamshards.format import ShardError
from streamshards.index import IndexFormatError


def publish(name: str, bucket: str, damage: str | None = None) -> str:
    """Put a fixture's files into the bucket as they are (one flipped byte in ``damage``)."""
    import boto3

    client = boto3.client("s3")
    folder = FIXTURES / name / "data"
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = bytearray(path.read_bytes())
            if path.name == damage:
                data[len(data) // 2] ^= 1
            key = f"{name}/{path.relative_to(folder)}"
            client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    return f"s3://{bucket}/{name}"


@pytest.mark.parametrize("name", ["mds_text_zstd", "mds_tokens_int32", "litdata_tokens"])
def test_remote_foreign_dataset_reads_like_the_library(s3_bucket, tmp_path, name):
    url = publish(name, s3_bucket)
    stream = Stream(remote=url, local=str(tmp_path / "cache"), options=options(name))
    ds = StreamingDataset(streams=[stream], cache_limit=2 * 40_000, batch_size=5)
    assert len(ds) == expected(name)["num_samples"]
    assert [comparable(name, s) for s in ds] == expected_samples(name)
    assert [comparable(name, ds[i]) for i in range(len(ds))] == expected_samples(name)


def test_remote_foreign_dataset_through_loader_workers(s3_bucket, tmp_path):
    """Worker processes get the foreign reader with the dataset (pickled or forked)."""
    import multiprocessing

    from streamshards import StreamingDataLoader

    url = publish("mds_tokens_int32", s3_bucket)
    ds = StreamingDataset(remote=url, local=str(tmp_path / "cache"), batch_size=8)
    context = multiprocessing.get_context("spawn")
    loader = StreamingDataLoader(ds, num_workers=2, multiprocessing_context=context)
    rows = [row.tolist() for batch in loader for row in batch["tokens"]]
    assert rows == [s["tokens"] for s in expected("mds_tokens_int32")["samples"]]


def test_remote_damaged_shard_is_refused_by_name(s3_bucket, tmp_path):
    url = publish("mds_text", s3_bucket, damage="shard.00004.mds")
    ds = StreamingDataset(remote=url, local=str(tmp_path / "cache"))
    with pytest.raises(ShardError, match=r"shard shard.00004.mds: .*xxh64="):
        [ds[i] for i in range(len(ds))]


def test_remote_merged_subfolders_are_refused(s3_bucket, tmp_path):
    url = publish("mds_merged", s3_bucket)
    with pytest.raises(IndexFormatError, match="subfolder"):
        StreamingDataset(remote=url, local=str(tmp_path / "cache"))


def test_convert_a_remote_foreign_dataset(s3_bucket, tmp_path):
    from click.testing import CliRunner

    from streamshards.cli import main

    url = publish("mds_tokens_bytes_int64", s3_bucket)
    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["convert", url, out])
    assert result.exit_code == 0, result.output
    ds = StreamingDataset(local=out)
    assert ds.columns == {"tokens": "ndarray:uint16:129"}
    name = "mds_tokens_bytes_int64"
    assert [comparable(name, ds[i]) for i in range(len(ds))] == expected_samples(name)
    assert ds.sources[0].index.provenance["converted_from"]["source"] == url
