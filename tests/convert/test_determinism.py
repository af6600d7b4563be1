"""Output bytes depend on the inputs and options only: not on workers, unit size or timing."""

from __future__ import annotations

from convert_helpers import SAMPLE, TOKENIZER, dataset_files, run_convert, sample_docs, write_jsonl


def test_one_and_two_workers_write_byte_identical_datasets(tmp_path):
    docs = sample_docs(400)
    inputs = [
        write_jsonl(tmp_path / "a.jsonl.gz", docs[:250], "gzip"),
        write_jsonl(tmp_path / "b.jsonl", docs[200:] + docs[:10]),
    ]
    common = [
        "--tokenizer",
        TOKENIZER,
        "--seq-len",
        "96",
        "--dedup",
        "--min-chars",
        "200",
        "--unit-size",
        "32KB",
        "--size-limit",
        "50KB",
    ]
    run_convert(*inputs, tmp_path / "one", "--workers", "1", *common)
    run_convert(*inputs, tmp_path / "two", "--workers", "2", *common)
    one = dataset_files(tmp_path / "one")
    assert len(one) > 3
    assert one == dataset_files(tmp_path / "two")


def test_raw_output_does_not_depend_on_workers_or_unit_size(tmp_path):
    common = ["--keep-fields", "url,timestamp", "--size-limit", "300KB"]
    run_convert(SAMPLE, tmp_path / "a", "--workers", "1", "--unit-size", "4MB", *common)
    run_convert(SAMPLE, tmp_path / "b", "--workers", "2", "--unit-size", "100KB", *common)
    a, b = dataset_files(tmp_path / "a"), dataset_files(tmp_path / "b")
    assert a.pop("index.json") != b.pop("index.json")  # only the recorded unit size differs
    assert a == b and len(a) > 2
