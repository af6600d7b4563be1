"""Datasets and a process driver for the sample-order tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamshards import ShardWriter


def write_dataset(folder: Path, stream: int, count: int, size_limit: str = "400B") -> Path:
    """A dataset whose samples carry their stream number and their id (0..count-1)."""
    rng = np.random.default_rng(count)
    columns = {"stream": "int64", "id": "int64", "tokens": "ndarray:uint16:3"}
    with ShardWriter(folder, columns, compression=None, size_limit=size_limit) as writer:
        for i in range(count):
            tokens = rng.integers(0, 60000, 3)
            writer.write({"stream": stream, "id": i, "tokens": tokens})
    return folder


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """499 samples in uneven shards: a prime count exercises every remainder rule."""
    return write_dataset(tmp_path_factory.mktemp("small"), 0, 499)


@pytest.fixture(scope="session")
def mix_data(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("mix")
    return [write_dataset(base / "a", 0, 300), write_dataset(base / "b", 1, 120)]


@pytest.fixture
def make_dataset():
    """The ``write_dataset`` function, for tests that need their own dataset."""
    return write_dataset
