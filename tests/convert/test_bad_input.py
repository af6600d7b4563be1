"""Bad input: fail names the file and line and leaves no index; skip counts and records it."""

from __future__ import annotations

import gzip

import pytest
from convert_helpers import run_convert, samples, write_jsonl

from streamshards.index import load_index

GOOD = b'{"text": "good one"}\n'
CASES = {
    "malformed_json": (b'{"text": "broken"\n', "malformed JSON"),
    "missing_field": (b'{"body": "no text here"}\n', "no field 'text'"),
    "invalid_utf8": (b'{"text": "bad \xff byte"}\n', "invalid UTF-8"),
    "wrong_type": (b'{"text": 42}\n', "expected a string"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_bad_line_fails_naming_file_and_line_or_is_skipped_and_counted(tmp_path, kind):
    bad, message = CASES[kind]
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD * 3 + bad + GOOD)
    out = tmp_path / "out"
    failed = run_convert(path, out, "--workers", "1", expect_ok=False)
    assert failed.exit_code != 0
    assert f"{path}:4" in failed.output and message in failed.output
    assert not (out / "index.json").exists()
    run_convert(path, out, "--on-error", "skip", "--workers", "2", "--unit-size", "30B")
    assert [s["text"] for s in samples(out)] == ["good one"] * 4
    documents = load_index(out).provenance["documents"]
    assert documents["bad_records_skipped"] == ({kind: 1})


def test_a_truncated_gzip_fails_or_keeps_the_lines_before_the_cut(tmp_path):
    docs = [{"text": f"document number {i} " * 20} for i in range(400)]
    data = gzip.compress("".join(f'{{"text": "{d["text"]}"}}\n' for d in docs).encode(), mtime=0)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    failed = run_convert(path, tmp_path / "out", "--workers", "1", expect_ok=False)
    assert failed.exit_code != 0
    assert str(path) in failed.output and "unreadable after line" in failed.output
    assert not (tmp_path / "out" / "index.json").exists()
    run_convert(path, tmp_path / "out", "--on-error", "skip", "--workers", "1")
    texts = [s["text"] for s in samples(tmp_path / "out")]
    assert 0 < len(texts) < len(docs)
    assert texts == [d["text"] for d in docs[: len(texts)]]
    (entry,) = load_index(tmp_path / "out").provenance["inputs"]
    assert f"unreadable after line {len(texts)}" in entry["read_error"]


def test_a_file_that_is_not_gzip_is_named(tmp_path):
    path = write_jsonl(tmp_path / "fake.json.gz", [{"text": "plain"}])
    failed = run_convert(path, tmp_path / "out", expect_ok=False)
    assert failed.exit_code != 0 and "fake.json.gz" in failed.output
    assert "gzip" in failed.output.lower()


@pytest.mark.parametrize(
    "content", [b"", b"\n\n", b'{"text": ""}\n'], ids=["empty", "blank", "empty-text"]
)
def test_empty_input_gives_a_clear_message_and_no_dataset(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    failed = run_convert(path, tmp_path / "out", "--workers", "1", expect_ok=False)
    assert failed.exit_code != 0 and "no documents to write" in failed.output
    assert not (tmp_path / "out").exists()


def test_too_few_tokens_for_one_sequence_is_refused(tmp_path):
    from convert_helpers import TOKENIZER

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}])
    failed = run_convert(
        path, tmp_path / "out", "--tokenizer", TOKENIZER, "--seq-len", "64", expect_ok=False
    )
    assert failed.exit_code != 0 and "a full sequence of 64" in failed.output


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["missing.jsonl"], "does not exist"),
        (["*.nothing"], "matches no file"),
        (["notes.csv"], "unsupported file type"),
    ],
)
def test_inputs_that_name_nothing_usable_are_refused(tmp_path, monkeypatch, inputs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.csv").write_text("a,b\n")
    failed = run_convert(*inputs, tmp_path / "out", expect_ok=False)
    assert failed.exit_code != 0 and message in failed.output
