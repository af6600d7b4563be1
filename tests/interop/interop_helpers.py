"""The MDS and LitData fixtures written by the real libraries, and how to compare with them."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "interop"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.json").exists())


def expected(name: str) -> dict[str, Any]:
    """The fixture's expected.json: what the peer library yielded."""
    return json.loads((FIXTURES / name / "expected.json").read_text())


def options(name: str) -> dict[str, Any]:
    """The reader options a fixture needs: a block size for tokens, pickle as bytes."""
    exp = expected(name)
    if "block_size" in exp:
        return {"block_size": exp["block_size"]}
    if name == "mds_pkl":
        return {"pkl_as_bytes": True}
    return {}


def as_json(value: Any, kind: str) -> Any:
    """A value we yield, written the way expected.json writes that column's kind."""
    if kind in ("array", "int64_bytes"):
        return np.asarray(value).tolist()
    if kind == "bytes_b64":
        return base64.b64encode(bytes(value)).decode()
    if kind == "float":
        return float(value)
    if kind == "int":
        return int(value)
    return value


def comparable(name: str, sample: dict) -> dict:
    """A sample as expected.json lists it (a pickled column is compared as bytes elsewhere)."""
    kinds = expected(name)["kinds"]
    return {k: as_json(sample[k], kinds[k]) for k in kinds if k in sample and k != "pyobj"}


def expected_samples(name: str) -> list[dict]:
    """expected.json's samples without the pickled column."""
    return [{k: v for k, v in s.items() if k != "pyobj"} for s in expected(name)["samples"]]
