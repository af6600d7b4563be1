"""T3/T4: a run killed with SIGKILL, or stopped with SIGTERM, resumes to the same losses."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import yaml
from trainer_helpers import (
    command,
    events,
    kill_all,
    losses,
    start,
    train,
    wait_for_step,
)

from trainer.checkpoint import complete_checkpoints
from trainer.metrics import read_metrics


def test_sigkill_at_a_random_step_then_resume_gives_identical_losses(
    tmp_path: Path, token_data: Path, reference: Path
) -> None:
    kill_after = random.Random().randint(4, 9)
    run_dir = tmp_path / "run"
    proc = start(command(token_data, run_dir), tmp_path / "killed.log")
    reached = wait_for_step(proc, run_dir, kill_after)
    kill_all(proc)
    assert complete_checkpoints(run_dir / "checkpoints"), f"no checkpoint by step {reached}"

    code, output = train(token_data, run_dir)
    assert code == 0, output
    (resume,) = events(run_dir, "resume")
    assert 3 <= resume["step"] <= reached, resume
    expected = losses(reference)
    assert losses(run_dir) == expected, f"killed after step {reached}, resumed at {resume['step']}"
    assert list(expected) == list(range(1, 11))


def test_resume_on_one_process_after_two_ranks(
    tmp_path: Path, token_data: Path, reference: Path
) -> None:
    run_dir = tmp_path / "run"
    code, output = train(token_data, run_dir, "max_steps=6")
    assert code == 0, output
    code, output = train(token_data, run_dir, nproc=0)  # no torchrun: one plain process
    assert code == 0, output

    (resume,) = events(run_dir, "resume")
    assert (resume["step"], resume["saved_world_size"], resume["world_size"]) == (6, 2, 1)
    steps, _ = read_metrics(run_dir)
    ref_steps, _ = read_metrics(reference)
    # The same global batches (the loader state is global) ...
    assert [steps[s]["samples_seen"] for s in range(1, 11)] == [8 * s for s in range(1, 11)]
    # ... and the same weights (DCP reshards): only the order of float sums over ranks differs.
    for step in range(7, 11):
        assert steps[step]["loss"] == pytest.approx(ref_steps[step]["loss"], rel=1e-5), step


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits(
    tmp_path: Path, token_data: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = start(
        command(token_data, run_dir, "max_steps=1000", "save_interval=1000"),
        tmp_path / "sigterm.log",
    )
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
    proc.wait(timeout=60)

    steps, _ = read_metrics(run_dir)
    (stop,) = events(run_dir, "stop")
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in saved] == [max(steps)] == [stop["step"]]
    state = json.loads((saved[0][1] / "trainer.json").read_text())
    assert state["loader"]["samples_seen"] == 8 * max(steps)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_keep_last_and_only_complete_checkpoints_are_listed(
    tmp_path: Path, token_data: Path, reference: Path
) -> None:
    effective = yaml.safe_load((reference / "config.yaml").read_text())
    assert effective["model"]["vocab_size"] == 512  # auto: the tokenizer's 500, rounded to 64
    saved = complete_checkpoints(reference / "checkpoints")
    assert [step for step, _ in saved] == [9, 10]  # keep_last=2; the last step is always saved
    # An unfinished checkpoint (no COMPLETE marker) is never picked up.
    partial = tmp_path / "checkpoints" / "step_00000099"
    partial.mkdir(parents=True)
    assert complete_checkpoints(tmp_path / "checkpoints") == []
