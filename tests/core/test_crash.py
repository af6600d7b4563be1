"""F5: a writer killed with SIGKILL at any point leaves the old dataset, no index, or the new
dataset, never an index naming a missing or partial shard.

Writers run in forked child processes (the test process has already paid for the imports) and
die by a real SIGKILL: at random times while rewriting a dataset in a loop, and at every
file-system step of one write (before each fsync, rename and unlink).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import signal
from pathlib import Path

from click.testing import CliRunner
from core_helpers import text_samples, write_dataset

from streamshards import StreamingDataset, load_index
from streamshards.cli import main
from streamshards.index import INDEX_NAME

COLUMNS = {"id": "int64", "text": "str"}
FORK = multiprocessing.get_context("fork")


def dataset_state(out: Path) -> int | None:
    """None when ``out`` has no index; else the round number of the complete dataset it holds.

    Fails if the index is unreadable, `streamshards verify` rejects a shard, or the samples
    are not exactly those the writer wrote in that round.
    """
    if not (out / INDEX_NAME).exists():
        return None
    index = load_index(out)
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    round_number = index.provenance["round"]
    ds = StreamingDataset(local=out)
    assert [ds[i] for i in range(len(ds))] == text_samples(40, seed=round_number)
    return round_number


def write_round(out: Path, round_number: int, size_limit: int = 900) -> None:
    write_dataset(
        out,
        COLUMNS,
        text_samples(40, seed=round_number),
        size_limit=size_limit,
        overwrite=True,
        provenance={"round": round_number},
    )


def rewrite_forever(out: Path, started) -> None:
    """Rewrite the dataset over and over, one round number higher each time."""
    started.set()
    for round_number in itertools.count(1):
        write_round(out, round_number)


def test_random_sigkill_during_rewrites_leaves_a_valid_dataset_or_none(tmp_path: Path) -> None:
    rng = random.Random(5)
    outcomes = []
    for trial in range(8):
        out = tmp_path / f"trial{trial}"
        started = FORK.Event()
        child = FORK.Process(target=rewrite_forever, args=(out, started))
        child.start()
        assert started.wait(30)
        child.join(rng.uniform(0.01, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        outcomes.append(dataset_state(out))
    assert None in outcomes, "no kill landed while a round was being written"


def die_at_step(step: int) -> None:
    """Make this process SIGKILL itself just before its ``step``-th fsync, rename or unlink."""
    counter = itertools.count(1)

    def armed(call):
        def wrapper(*args, **kwargs):
            if next(counter) == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return call(*args, **kwargs)

        return wrapper

    os.fsync, os.replace, os.unlink = armed(os.fsync), armed(os.replace), armed(os.unlink)


def overwrite_dying(out: Path, step: int) -> None:
    die_at_step(step)
    write_round(out, 2, size_limit=3000)


def count_steps(out: Path) -> int:
    """How many fsync/rename/unlink calls one overwrite of a dataset at ``out`` makes."""
    write_round(out, 1)
    calls = []
    saved = os.fsync, os.replace, os.unlink

    def counted(call):
        def wrapper(*args, **kwargs):
            calls.append(call.__name__)
            return call(*args, **kwargs)

        return wrapper

    os.fsync, os.replace, os.unlink = (counted(call) for call in saved)
    try:
        write_round(out, 2, size_limit=3000)
    finally:
        os.fsync, os.replace, os.unlink = saved
    assert {"fsync", "replace", "unlink"} <= set(calls), calls
    return len(calls)


def test_overwrite_killed_at_every_step_leaves_old_or_no_or_new_dataset(tmp_path: Path) -> None:
    """Kill an overwrite before each of its file-system steps: the folder holds the old
    dataset (round 1), no index, or the complete new one (round 2)."""
    steps = count_steps(tmp_path / "probe")
    outcomes = []
    for step in range(1, steps + 2):
        out = tmp_path / f"step{step}"
        write_round(out, 1)
        child = FORK.Process(target=overwrite_dying, args=(out, step))
        child.start()
        child.join()
        assert child.exitcode == (-signal.SIGKILL if step <= steps else 0), step
        outcomes.append(dataset_state(out))
    assert outcomes[0] == 1, "killed before its first step, the overwrite left the old dataset"
    assert outcomes[-1] == 2, "the overwrite that was not killed left the new dataset"
    assert None in outcomes
    assert set(outcomes) == {1, None, 2}


def test_index_is_as_readable_as_the_shards(tmp_path: Path) -> None:
    """The index is created with the same permissions as the shard files (the umask's)."""
    write_round(tmp_path, 1)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
