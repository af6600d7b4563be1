"""Foreign datasets get the native order: exactly once over ranks and worker processes, and
a resumed run continues the uninterrupted one (real processes, as in tests/order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from interop_helpers import FIXTURES, expected

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "order"))
from test_loader_processes import global_sequence, save_shared_state  # noqa: E402

DRIVE = Path(__file__).with_name("drive_foreign.py")
GLOBAL_BATCH = 6
CASES = {"mds_text": ("n", {}), "litdata_tokens": ("tokens", {"block_size": 65})}


def drive(tmp_path: Path, name: str, *args: str, out: str = "out") -> dict[int, dict[int, dict]]:
    """Run the driver in a fresh process: {workers: {rank: {"batches", "state"}}}."""
    key, options = CASES[name]
    stream = {"local": str(FIXTURES / name / "data"), "options": options}
    path = tmp_path / f"{out}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INTEROP_KEY": key}
    command = [sys.executable, str(DRIVE), "--streams", json.dumps([stream]), *args]
    subprocess.run([*command, "--out", str(path)], check=True, env=env)
    runs = json.loads(path.read_text())["runs"]
    return {int(w): {int(r): v for r, v in ranks.items()} for w, ranks in runs.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_exactly_once_over_ranks_and_workers(tmp_path, name):
    """One global sequence, every sample once, for 1, 2 and 3 ranks with 0 and 2 workers."""
    (reference,) = drive(tmp_path, name, "--batch", str(GLOBAL_BATCH), out="ref").values()
    sequence = global_sequence(reference, 1)
    assert len(sequence) == expected(name)["num_samples"] == len(set(sequence))
    if name != "litdata_tokens":
        assert sorted(i for _, i in sequence) == sorted(s["n"] for s in expected(name)["samples"])
    for world in (2, 3):
        batch = str(GLOBAL_BATCH // world)
        runs = drive(tmp_path, name, "--world", str(world), "--workers", "0,2", "--batch", batch)
        for workers, ranks in runs.items():
            got = global_sequence(ranks, world)
            assert got == sequence, f"{world} ranks, {workers} workers: another global sequence"


@pytest.mark.parametrize("name", ["mds_text"])
def test_resume_equals_uninterrupted(tmp_path, name):
    """A state saved mid-epoch and loaded in a new process yields the remaining batches."""
    common = ["--batch", "4", "--world", "2", "--epochs", "2"]
    (full,) = drive(tmp_path, name, *common, out="full").values()
    (first,) = drive(tmp_path, name, *common, "--workers", "2", "--steps", "50", out="a").values()
    state = save_shared_state(tmp_path, first, 2)
    (rest,) = drive(tmp_path, name, *common, "--state-in", str(state), out="b").values()
    for rank in range(2):
        resumed = first[rank]["batches"] + rest[rank]["batches"]
        assert resumed[: len(full[rank]["batches"])] == full[rank]["batches"]
