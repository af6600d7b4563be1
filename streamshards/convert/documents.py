"""Turning a unit's records into documents: parsing, bad-input handling and filters.

Runs inside the workers. Every decision here is a function of one record alone, so it gives
the same answer in any worker; deduplication, which needs all earlier documents, is left to
the ordered writer (see pack.py).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import xxhash

from streamshards.convert.errors import ConvertError
from streamshards.convert.inputs import FORMATS, TOO_DEEP

# Bad-input kinds, counted under provenance "errors" when --on-error skip (with those that
# parsing a unit finds: inputs.MALFORMED_JSON, INVALID_UTF8 and TOO_DEEP).
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
LONE_SURROGATE = "lone_surrogate"
NOT_FINITE = "nan_or_infinity"


@dataclass(frozen=True)
class DocumentRules:
    """How to read and filter documents; plain values so that it travels to worker processes."""

    text_field: str = "text"
    keep_fields: tuple[tuple[str, str], ...] = ()
    txt_per_line: bool = False
    on_error: str = "fail"
    min_chars: int | None = None
    max_chars: int | None = None
    user_filter: str | None = None
    dedup: bool = False


@dataclass
class Documents:
    """The documents a unit kept, with what was dropped and why."""

    texts: list[str]
    extras: list[tuple]
    hashes: list[bytes]
    dropped: Counter
    errors: Counter
    read: int = 0


def load_filter(spec: str) -> Callable[[dict], bool]:
    """Import ``module:function`` (the current folder is importable) for --filter."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConvertError(f"--filter {spec!r}: expected module:function, e.g. myfilters:keep")
    folder = os.getcwd()
    added = folder not in sys.path
    if added:  # importable while the module loads, not left on the caller's sys.path
        sys.path.insert(0, folder)
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConvertError(f"--filter {spec!r}: cannot import it: {err}") from None
    finally:
        if added:
            sys.path.remove(folder)
    if not callable(function):
        raise ConvertError(f"--filter {spec!r}: {attr} is not a function")
    return function


def dedup_key(text: str) -> bytes:
    """Exact-duplicate key: xxh3-128 of the text lowercased with whitespace runs collapsed."""
    return xxhash.xxh3_128_digest(" ".join(text.lower().split()).encode("utf-8"))


class DocumentReader:
    """Parses and filters the records of units of one job."""

    def __init__(self, rules: DocumentRules):
        self.rules = rules
        self.keep = load_filter(rules.user_filter) if rules.user_filter else None

    def _bad(self, docs: Documents, kind: str, message: str) -> None:
        if self.rules.on_error == "fail":
            raise ConvertError(f"{message} (use --on-error skip to skip such records)")
        docs.errors[kind] += 1

    def read(self, kind: str, payload, path: str, first_line: int) -> Documents:
        """Parse one unit's payload by its file's format (``kind``, an ``inputs.FORMATS`` key)
        and apply every per-document filter, in a fixed order."""
        rules = self.rules
        docs = Documents([], [], [], Counter(), Counter())
        bad = partial(self._bad, docs)
        for number, record in FORMATS[kind].records(payload, path, first_line, rules, bad):
            docs.read += 1
            text = record.get(rules.text_field)
            if text is None:
                self._bad(docs, MISSING_FIELD, f"{path}:{number}: no field {rules.text_field!r}")
                continue
            if not isinstance(text, str):
                self._bad(
                    docs,
                    WRONG_TYPE,
                    f"{path}:{number}: field {rules.text_field!r} is "
                    f"{type(text).__name__}, expected a string",
                )
                continue
            if not _encodable(text):
                self._bad(
                    docs,
                    LONE_SURROGATE,
                    f"{path}:{number}: field {rules.text_field!r} holds a lone surrogate "
                    "(e.g. \\ud800), which is not Unicode text",
                )
                continue
            extras = self._extras(docs, record, path, number)
            if extras is None:
                continue
            reason = self._drop_reason(text, record)
            if reason:
                docs.dropped[reason] += 1
                continue
            docs.texts.append(text)
            docs.extras.append(extras)
            if rules.dedup:
                docs.hashes.append(dedup_key(text))
        return docs

    def _extras(self, docs: Documents, record: dict, path: str, number: int) -> tuple | None:
        values = []
        for name, ctype in self.rules.keep_fields:
            value = record.get(name)
            if ctype == "str" and not isinstance(value, str):
                found = "missing" if name not in record else f"{type(value).__name__}"
                self._bad(
                    docs,
                    MISSING_FIELD if name not in record else WRONG_TYPE,
                    f"{path}:{number}: kept field {name!r} is {found}, expected a string "
                    f"(keep it as JSON with --keep-fields {name}:json)",
                )
                return None
            problem = _unstorable(value) if ctype == "json" else None
            if ctype == "str" and not _encodable(value):
                problem = LONE_SURROGATE, "holds a lone surrogate (e.g. \\ud800)"
            if problem:
                self._bad(docs, problem[0], f"{path}:{number}: kept field {name!r} {problem[1]}")
                return None
            values.append(value)
        return tuple(values)

    def _drop_reason(self, text: str, record: dict) -> str | None:
        rules = self.rules
        if not text:
            return "empty"
        if rules.min_chars is not None and len(text) < rules.min_chars:
            return "min_chars"
        if rules.max_chars is not None and len(text) > rules.max_chars:
            return "max_chars"
        if self.keep is not None and not self.keep(record):
            return "filter"
        return None


def _encodable(text: str) -> bool:
    """True unless ``text`` holds a lone surrogate, which UTF-8 cannot store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unstorable(value: Any) -> tuple[str, str] | None:
    """(kind, why) if a kept json value cannot be stored as strict JSON text, else None."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError as err:
        if isinstance(err, UnicodeEncodeError):
            return LONE_SURROGATE, "holds a lone surrogate (e.g. \\ud800)"
        return NOT_FINITE, "holds NaN or Infinity, which JSON cannot store"
    except RecursionError:
        return TOO_DEEP, "is nested too deep to store"
    return None
