"""The command line: registered under streamshards, a summary table, provenance via inspect."""

from __future__ import annotations

import json

from click.testing import CliRunner
from convert_helpers import TOKENIZER, run_convert, sample_docs, write_jsonl

from streamshards.cli import main


def test_summary_table_reports_documents_tokens_shards_bytes_and_drops(tmp_path):
    corpus = write_jsonl(tmp_path / "c4.json.gz", sample_docs(300), "gzip")
    result = run_convert(
        corpus,
        tmp_path / "out",
        "--tokenizer",
        TOKENIZER,
        "--seq-len",
        "256",
        "--min-chars",
        "1000",
        "--workers",
        "2",
    )
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    for row in ("documents", "samples", "tokens", "shards", "bytes", "time", "units", "dropped"):
        assert row in lines, result.output
    assert "min_chars" in lines["dropped"] and "tok/s" in lines["time"]


def test_inspect_shows_the_provenance_convert_recorded(tmp_path):
    out = tmp_path / "out"
    corpus = write_jsonl(tmp_path / "c4.json.gz", sample_docs(300), "gzip")
    run_convert(corpus, out, "--tokenizer", TOKENIZER, "--seq-len", "256", "--workers", "1")
    shown = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    provenance = json.loads(shown.output)["provenance"]
    assert provenance["seq_len"] == 256
    assert provenance["tokenizer"]["vocab_size"] == 4096
    assert provenance["inputs"][0]["bytes"] == corpus.stat().st_size
    assert provenance["documents"]["read"] == 300
    help_text = CliRunner().invoke(main, ["convert", "--help"]).output
    assert "--tokenizer" in help_text and "--on-error" in help_text
