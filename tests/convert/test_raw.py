"""Raw mode: one sample per document with its kept fields, from every supported input format."""

from __future__ import annotations

import json

import pytest
from convert_helpers import SAMPLE, run_convert, sample_docs, samples, write_jsonl

from streamshards.index import load_index


def test_c4_file_becomes_one_sample_per_document_with_kept_fields(tmp_path):
    out = tmp_path / "out"
    run_convert(
        SAMPLE,
        out,
        "--keep-fields",
        "url,timestamp",
        "--workers",
        "2",
        "--size-limit",
        "1MB",
        "--unit-size",
        "256KB",
    )
    docs = sample_docs()
    got = samples(out)
    assert got == [{"text": d["text"], "url": d["url"], "timestamp": d["timestamp"]} for d in docs]
    index = load_index(out)
    assert len(index.shards) > 1
    assert index.columns == {"text": "str", "url": "str", "timestamp": "str"}
    assert index.provenance["documents"]["read"] == len(docs)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_every_input_format_gives_the_same_samples(tmp_path, suffix):
    docs = sample_docs(40)
    path = tmp_path / f"docs{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(docs), path, row_group_size=7)
    else:
        write_jsonl(path, docs, {".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}.get(suffix))
    run_convert(
        path, tmp_path / "out", "--keep-fields", "url", "--workers", "1", "--unit-size", "16KB"
    )
    assert samples(tmp_path / "out") == [{"text": d["text"], "url": d["url"]} for d in docs]


def test_text_files_one_document_per_file_or_per_line(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("first document\nstill the first\n", encoding="utf-8")
    (folder / "b.txt").write_text("second document", encoding="utf-8")
    run_convert(folder, tmp_path / "files", "--workers", "1")
    assert [s["text"] for s in samples(tmp_path / "files")] == [
        "first document\nstill the first\n",
        "second document",
    ]
    run_convert(folder, tmp_path / "lines", "--txt-per-line", "--workers", "1")
    assert [s["text"] for s in samples(tmp_path / "lines")] == [
        "first document",
        "still the first",
        "second document",
    ]


def test_non_string_fields_are_kept_as_json_when_asked(tmp_path):
    docs = [{"text": "a", "meta": {"n": 1, "tags": ["x"]}}, {"text": "b", "meta": None}]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    run_convert(path, tmp_path / "out", "--keep-fields", "meta:json", "--workers", "1")
    assert samples(tmp_path / "out") == docs
    assert load_index(tmp_path / "out").columns["meta"] == "json"
    result = run_convert(path, tmp_path / "bad", "--keep-fields", "meta", expect_ok=False)
    assert result.exit_code != 0
    assert "d.jsonl:1" in result.output and "meta:json" in result.output


def test_inputs_are_read_in_the_order_given_folders_and_globs_sorted(tmp_path):
    for name in ("b", "a", "c"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": name}])
    run_convert(
        tmp_path / "c.jsonl",
        str(tmp_path / "[ab].jsonl"),
        tmp_path / "c.jsonl",
        tmp_path / "out",
        "--workers",
        "1",
    )
    assert [s["text"] for s in samples(tmp_path / "out")] == ["c", "a", "b"]
    inputs = load_index(tmp_path / "out").provenance["inputs"]
    assert [json.dumps(i["file"]).endswith('.jsonl"') for i in inputs] == [True] * 3
