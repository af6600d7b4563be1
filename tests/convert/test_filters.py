"""Filters: length bounds, exact dedup (first occurrence in input order wins), user predicates."""

from __future__ import annotations

import textwrap

from convert_helpers import TOKENIZER, run_convert, samples, write_jsonl

from streamshards.index import load_index


def test_length_bounds_drop_documents_and_count_them(tmp_path):
    docs = [{"text": "x" * n} for n in (1, 5, 10, 11, 50, 0)]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    run_convert(path, tmp_path / "out", "--min-chars", "5", "--max-chars", "10", "--workers", "1")
    assert [len(s["text"]) for s in samples(tmp_path / "out")] == [5, 10]
    provenance = load_index(tmp_path / "out").provenance
    assert provenance["documents"] == {
        "read": 6,
        "written": 2,
        "dropped": {"empty": 1, "max_chars": 2, "min_chars": 1},
        "bad_records_skipped": {},
    }
    assert provenance["filters"]["min_chars"] == 5 and provenance["filters"]["max_chars"] == 10


def test_dedup_keeps_the_first_occurrence_across_files_units_and_workers(tmp_path):
    first = [{"text": f"Document {i}\nbody {i % 7}", "n": f"a{i}"} for i in range(300)]
    second = [{"text": f"  document {i}  BODY {i % 7} ", "n": f"b{i}"} for i in range(250, 400)]
    a = write_jsonl(tmp_path / "a.jsonl", first)
    b = write_jsonl(tmp_path / "b.jsonl.gz", second, "gzip")
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        run_convert(
            a,
            b,
            a,
            out,
            "--dedup",
            "--keep-fields",
            "n",
            "--workers",
            workers,
            "--unit-size",
            "2KB",
        )
        kept = [s["n"] for s in samples(out)]
        assert kept == [f"a{i}" for i in range(300)] + [f"b{i}" for i in range(300, 400)]
        documents = load_index(out).provenance["documents"]
        assert documents["dropped"] == {"duplicate": 50}


def test_dedup_applies_before_packing_in_tokenized_mode(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "same"}, {"text": "other"}, {"text": "same"}]
    )
    run_convert(
        path,
        tmp_path / "out",
        "--dedup",
        "--tokenizer",
        TOKENIZER,
        "--seq-len",
        "1",
        "--workers",
        "1",
    )
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, [{"text": "same"}, {"text": "other"}])
    run_convert(
        plain, tmp_path / "ref", "--tokenizer", TOKENIZER, "--seq-len", "1", "--workers", "1"
    )
    assert [s["tokens"].tolist() for s in samples(tmp_path / "out")] == [
        s["tokens"].tolist() for s in samples(tmp_path / "ref")
    ]


def test_user_filter_sees_the_whole_document_and_runs_in_every_worker(tmp_path, monkeypatch):
    (tmp_path / "myfilters.py").write_text(
        textwrap.dedent(
            """
            def keep_english(doc):
                return doc["lang"] == "en"
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    docs = [{"text": f"t{i}", "lang": "en" if i % 3 else "fr"} for i in range(60)]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        run_convert(
            path,
            out,
            "--filter",
            "myfilters:keep_english",
            "--workers",
            workers,
            "--unit-size",
            "100B",
        )
        assert [s["text"] for s in samples(out)] == [f"t{i}" for i in range(60) if i % 3]
        provenance = load_index(out).provenance
        assert provenance["documents"]["dropped"] == {"filter": 20}
        assert provenance["filters"]["filter"] == "myfilters:keep_english"
    missing = run_convert(path, tmp_path / "x", "--filter", "myfilters:nope", expect_ok=False)
    assert missing.exit_code != 0 and "myfilters:nope" in missing.output
