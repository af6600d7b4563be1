"""Helpers shared by the shard-format tests: writing small datasets and comparing samples."""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from streamshards import ShardWriter


def write_dataset(out: Path, columns: dict[str, str], samples: list[dict], **options) -> Path:
    """Write ``samples`` with one ShardWriter and return the dataset folder."""
    with ShardWriter(out, columns, **options) as writer:
        for sample in samples:
            writer.write(sample)
    return out


def text_samples(count: int, seed: int = 0) -> list[dict]:
    """Deterministic samples of varied sizes for a {"id": int64, "text": str} dataset."""
    rng = np.random.default_rng(seed)
    return [
        {"id": k, "text": f"sample {k} " + "ab\u00e9\u6f22" * int(rng.integers(0, 60))}
        for k in range(count)
    ]


def same_value(expected: Any, actual: Any, ctype: str) -> bool:
    """Exact equality of one value: float bit patterns, array dtype + shape + bytes."""
    if ctype.startswith("ndarray"):
        expected = np.asarray(expected, dtype=np.dtype(ctype.split(":")[1]))
        return (
            isinstance(actual, np.ndarray)
            and actual.dtype == expected.dtype
            and actual.shape == expected.shape
            and actual.tobytes() == expected.tobytes()
        )
    if ctype == "float64":
        return isinstance(actual, float) and struct.pack("<d", expected) == struct.pack(
            "<d", actual
        )
    if ctype == "int64":
        return isinstance(actual, int) and actual == expected
    if ctype == "json":
        return _same_json(expected, actual)
    return type(actual) is type(expected) and actual == expected


def _same_json(expected: Any, actual: Any) -> bool:
    if isinstance(expected, float) and isinstance(actual, float):
        return math.copysign(1, expected) == math.copysign(1, actual) and expected == actual
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_same_json(e, a) for e, a in zip(expected, actual))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and list(actual) == list(expected)
            and all(_same_json(expected[k], actual[k]) for k in expected)
        )
    return type(actual) is type(expected) and actual == expected


def assert_same_sample(expected: dict, actual: dict, columns: dict[str, str], where: str) -> None:
    """Fail naming the sample and column whose value did not round-trip exactly."""
    assert list(actual) == list(columns), f"{where}: columns {list(actual)}"
    for name, ctype in columns.items():
        assert same_value(expected[name], actual[name], ctype), (
            f"{where}: column {name!r} ({ctype}) wrote {expected[name]!r}, read {actual[name]!r}"
        )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the installed ``streamshards`` console script as a user would."""
    command = shutil.which("streamshards")
    assert command, "the streamshards console script is not installed (pip install -e .)"
    return subprocess.run([command, *args], capture_output=True, text=True, timeout=120)
