"""O1-O4 and O7 with real processes: exactly once, world-size independence, exact resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

DRIVE = Path(__file__).with_name("drive.py")
GLOBAL_BATCH = 24  # divisible by every world size below, so all share one global batch


def drive_all(tmp_path: Path, *args: str, name: str = "out") -> dict[int, dict[int, dict]]:
    """Run drive.py in a fresh process: {workers: {rank: {"batches": ..., "state": ...}}}."""
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(DRIVE), *args, "--out", str(out)], check=True, env=env)
    return _keys_to_int(json.loads(out.read_text())["runs"])


def _keys_to_int(runs: dict) -> dict:
    return {int(w): {int(r): v for r, v in ranks.items()} for w, ranks in runs.items()}


def drive(tmp_path: Path, *args: str, name: str = "out") -> dict[int, dict]:
    """Like drive_all for one worker count: {rank: {"batches": ..., "state": ...}}."""
    (ranks,) = drive_all(tmp_path, *args, name=name).values()
    return ranks


def global_sequence(ranks: dict[int, dict], world: int, start: int = 0) -> list:
    """Rebuild the global sample sequence from per-rank batches (rank r read start+r+kW)."""
    flat = {r: [tuple(s) for b in ranks[r]["batches"] for s in b] for r in range(world)}
    total = sum(len(v) for v in flat.values())
    seq: list = [None] * total
    for r, samples in flat.items():
        for k, sample in enumerate(samples):
            seq[r + k * world] = sample
    assert None not in seq, "ranks' shares do not interleave into one sequence"
    return seq


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data) -> list:
    """The global sequence one process with no workers reads."""
    tmp_path = tmp_path_factory.mktemp("reference")
    ranks = drive(tmp_path, "--data", str(small_data), "--batch", str(GLOBAL_BATCH))
    return global_sequence(ranks, 1)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_exactly_once_and_same_global_sequence(tmp_path, small_data, reference, world):
    """Every sample once per epoch, and one global sequence whatever the ranks and workers."""
    assert sorted(i for _, i in reference) == list(range(499))
    runs = drive_all(
        tmp_path,
        "--data",
        str(small_data),
        "--world",
        str(world),
        "--workers",
        "0,1,2,3",
        "--batch",
        str(GLOBAL_BATCH // world),
    )
    assert sorted(runs) == [0, 1, 2, 3]
    for workers, ranks in runs.items():
        counts = {len(ranks[r]["batches"]) for r in range(world)}
        assert len(counts) == 1, f"ranks yield different batch counts: {counts}"
        seq = global_sequence(ranks, world)
        assert seq == reference, f"world {world}, {workers} workers: another global sequence"
        for step in range(len(ranks[0]["batches"])):
            sizes = [len(ranks[r]["batches"][step]) for r in range(world)]
            assert max(sizes) - min(sizes) <= 1


def test_shuffle_changes_each_epoch_and_is_not_identity(tmp_path, small_data):
    ranks = drive(tmp_path, "--data", str(small_data), "--batch", "8", "--epochs", "2")
    ids = [i for b in ranks[0]["batches"] for _, i in b]
    first, second = ids[:499], ids[499:]
    assert sorted(first) == sorted(second) == list(range(499))
    assert first != second
    assert first != list(range(499))


def test_no_shuffle_is_stored_order(tmp_path, small_data):
    ranks = drive(
        tmp_path,
        "--data",
        str(small_data),
        "--batch",
        "5",
        "--world",
        "2",
        "--no-shuffle",
        "--workers",
        "2",
    )
    assert [i for _, i in global_sequence(ranks, 2)] == list(range(499))


def test_drop_last_drops_only_the_partial_global_batch(tmp_path, small_data):
    ranks = drive(
        tmp_path,
        "--data",
        str(small_data),
        "--batch",
        "6",
        "--world",
        "4",
        "--drop-last",
        "--workers",
        "1",
    )
    seq = global_sequence(ranks, 4)
    assert len(seq) == 499 - 499 % 24 and len(set(seq)) == len(seq)


def save_shared_state(tmp_path: Path, run: dict, world: int) -> Path:
    """Check that every rank of ``run`` saved the same loader state and write it to a file."""
    states = {json.dumps(run[r]["state"], sort_keys=True) for r in range(world)}
    assert len(states) == 1, "ranks disagree on the loader state"
    state_file = tmp_path / "state.json"
    state_file.write_text(states.pop())
    return state_file


@pytest.mark.parametrize("workers_before,workers_after", [(0, 2), (3, 1)])
def test_resume_equals_uninterrupted(tmp_path, small_data, workers_before, workers_after):
    """A state saved after a random step, loaded in a new process, yields the same batches."""
    common = ["--data", str(small_data), "--batch", "7", "--world", "3", "--epochs", "2"]
    full = drive(tmp_path, *common, name="full")
    steps = 11 if workers_before == 0 else 30  # 24 batches an epoch: first and second epoch
    first = drive(
        tmp_path, *common, "--workers", str(workers_before), "--steps", str(steps), name="first"
    )
    state_file = save_shared_state(tmp_path, first, 3)
    rest = drive(
        tmp_path,
        *common,
        "--workers",
        str(workers_after),
        "--state-in",
        str(state_file),
        name="rest",
    )
    for rank in range(3):
        resumed = first[rank]["batches"] + rest[rank]["batches"]
        assert resumed[: len(full[rank]["batches"])] == full[rank]["batches"]


@pytest.mark.parametrize("world_before,world_after", [(4, 2), (2, 4), (4, 3)])
def test_elastic_resume_exactly_once(tmp_path, small_data, world_before, world_after):
    """A state saved on W ranks continues on W' ranks: every sample of the epoch once."""
    before = drive(
        tmp_path,
        "--data",
        str(small_data),
        "--batch",
        "6",
        "--world",
        str(world_before),
        "--steps",
        "9",
        name="before",
    )
    state_file = save_shared_state(tmp_path, before, world_before)
    after = drive(
        tmp_path,
        "--data",
        str(small_data),
        "--batch",
        "6",
        "--workers",
        "2",
        "--world",
        str(world_after),
        "--state-in",
        str(state_file),
        name="after",
    )
    seen = Counter(
        i
        for part, world in ((before, world_before), (after, world_after))
        for r in range(world)
        for b in part[r]["batches"]
        for _, i in b
    )
    assert set(seen) == set(range(499)) and set(seen.values()) == {1}
    full = global_sequence(
        drive(tmp_path, "--data", str(small_data), "--batch", "24", name="full"), 1
    )
    continued = global_sequence(before, world_before) + global_sequence(after, world_after)
    assert continued == full


def test_mixing_counts_exact_and_resume(tmp_path, mix_data):
    streams = json.dumps(
        [
            {"local": str(mix_data[0]), "proportion": 0.75},
            {"local": str(mix_data[1]), "proportion": 0.25},
        ]
    )
    common = ["--streams", streams, "--epoch-size", "400", "--batch", "8", "--world", "2"]
    full = drive(tmp_path, *common, "--workers", "1", name="full")
    counts = Counter(s for r in range(2) for b in full[r]["batches"] for s, _ in b)
    assert counts == {0: 300, 1: 100}
    per_stream = Counter((s, i) for r in range(2) for b in full[r]["batches"] for s, i in b)
    assert max(per_stream.values()) == 1, "down-sampling repeated a sample"
    part = drive(tmp_path, *common, "--steps", "10", name="part")
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(part[0]["state"]))
    rest = drive(tmp_path, *common, "--state-in", str(state_file), "--workers", "2", name="rest")
    for r in range(2):
        assert part[r]["batches"] + rest[r]["batches"] == full[r]["batches"]


def test_repeat_and_choose_counts(tmp_path, mix_data):
    streams = json.dumps(
        [{"local": str(mix_data[0]), "repeat": 0.5}, {"local": str(mix_data[1]), "repeat": 2.5}]
    )
    ranks = drive(tmp_path, "--streams", streams, "--batch", "10", name="repeat")
    pairs = Counter(tuple(s) for b in ranks[0]["batches"] for s in b)
    counts = Counter(s for s, _ in pairs.elements())
    assert counts == {0: 150, 1: 300}
    assert max(c for (s, _), c in pairs.items() if s == 1) == 3
    assert {i for (s, i) in pairs if s == 1} == set(range(120))
    streams = json.dumps([{"local": str(mix_data[0]), "choose": 7}, {"local": str(mix_data[1])}])
    ranks = drive(tmp_path, "--streams", streams, "--batch", "10", name="choose")
    counts = Counter(s for b in ranks[0]["batches"] for s, _ in b)
    assert counts == {0: 7, 1: 120}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_gloo_matches_simulated_ranks(tmp_path, small_data):
    """Ranks from torch.distributed (gloo, real torchrun) read what the env-var ranks read."""
    out = tmp_path / "dist.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(DRIVE),
        "--dist",
        "--data",
        str(small_data),
        "--batch",
        "12",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    subprocess.run(cmd, check=True, env=env, timeout=300)
    ranks = {}
    for r in range(2):
        runs = _keys_to_int(json.loads((tmp_path / f"dist.json.rank{r}").read_text())["runs"])
        ranks.update(runs[1])
    simulated = drive(
        tmp_path, "--data", str(small_data), "--batch", "12", "--world", "2", name="sim"
    )
    assert ranks == simulated
