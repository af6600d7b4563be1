"""Loading a Hugging Face ``tokenizers`` file, its fingerprint and separator tokens, and encoding.

Any ``tokenizer.json`` works (GPT-2, GPT-NeoX, Llama 3, one trained with ``tokenizers``).
Documents are encoded without the tokenizer's own template (``add_special_tokens=False``):
convert adds the separators itself, so the packed stream is exactly BOS? doc EOS? per document.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from streamshards.convert.errors import ConvertError

if TYPE_CHECKING:
    import tokenizers

EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[BOS]", "<|startoftext|>")


@dataclass(frozen=True)
class TokenizerInfo:
    """What the index records about the tokenizer, and the separators used when packing."""

    path: str
    xxh3_64: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    @property
    def dtype(self) -> np.dtype:
        """uint16 while every id fits, else uint32."""
        return np.dtype("<u2") if self.vocab_size <= 1 << 16 else np.dtype("<u4")

    def provenance(self) -> dict:
        return {
            "file": os.path.basename(self.path),
            "xxh3_64": self.xxh3_64,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
        }


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConvertError(
            "--tokenizer needs the tokenizers package: pip install 'streamshards[tokenize]'"
        ) from None
    return tokenizers


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` from a tokenizer.json, with a clear error on a bad file."""
    tokenizers = _import_tokenizers()
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as err:  # the Rust side raises plain Exception on a bad file
        raise ConvertError(
            f"--tokenizer {path}: cannot load it as a tokenizer.json: {err}"
        ) from None


def describe_tokenizer(path: str, eos_id: int | None, bos_id: int | None) -> TokenizerInfo:
    """Fingerprint, vocabulary size and separators (given ones, else the tokenizer's own)."""
    if not os.path.isfile(path):
        raise ConvertError(f"--tokenizer {path}: no such file")
    tokenizer = load_tokenizer(path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    if eos_id is None and bos_id is None:
        eos_id = next((vocab[n] for n in EOS_NAMES if n in special and n in vocab), None)
        bos_id = next((vocab[n] for n in BOS_NAMES if n in special and n in vocab), None)
    if eos_id is None and bos_id is None:
        raise ConvertError(
            f"--tokenizer {path}: it has no end-of-text or begin-of-text special token "
            f"({', '.join(EOS_NAMES)}); pass --eos-id or --bos-id to separate documents"
        )
    for option, token in (("--eos-id", eos_id), ("--bos-id", bos_id)):
        if token is not None and not 0 <= token < vocab_size:
            raise ConvertError(f"{option} {token} is outside the vocabulary (0..{vocab_size - 1})")
    with open(path, "rb") as f:
        fingerprint = xxhash.xxh3_64_hexdigest(f.read())
    return TokenizerInfo(path, fingerprint, vocab_size, eos_id, bos_id)


class Encoder:
    """Encodes lists of documents into one flat token array plus per-document lengths."""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.tokenizer = load_tokenizer(info.path)
        fast = getattr(self.tokenizer, "encode_batch_fast", None)
        self._encode_batch = fast or self.tokenizer.encode_batch

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(lengths int64[n], tokens dtype[sum(lengths)]) without any special tokens added."""
        ids = [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        tokens = np.fromiter(chain.from_iterable(ids), dtype=self.info.dtype, count=total)
        return lengths, tokens
