"""T5-T7 with injected faults in real 2-rank runs: OOM, loss spike and NaN, a hung rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import events, losses, train

from trainer.checkpoint import latest_checkpoint
from trainer.metrics import read_metrics
from trainer.watchdog import EXIT_CODE


def test_injected_oom_halves_the_microbatch_on_every_rank_and_redoes_the_step(
    tmp_path: Path, token_data: Path, reference: Path
) -> None:
    run_dir = tmp_path / "oom"
    code, output = train(token_data, run_dir, "inject.oom=3@1")  # step 3, rank 1 only
    assert code == 0, output
    assert "where=this rank" in output and "where=another rank" in output  # both agreed
    steps, _ = read_metrics(run_dir)
    assert [steps[s]["microbatch_size"] for s in range(1, 11)] == [4, 4] + [2] * 8
    saved = json.loads((latest_checkpoint(run_dir / "checkpoints") / "trainer.json").read_text())
    assert saved["microbatch_size"] == 2

    small_dir = tmp_path / "small"
    code, output = train(token_data, small_dir, "microbatch_size=2")
    assert code == 0, output
    ref, small, got = losses(reference), losses(small_dir), losses(run_dir)
    assert [got[s] for s in (1, 2)] == [ref[s] for s in (1, 2)]  # before the OOM: untouched
    # From the OOM on, the run is the microbatch-2 run; only the order in which microbatch
    # gradients are summed differs, so equality is to float rounding, not bitwise.
    assert list(got) == list(small) == list(range(1, 11))
    for step in got:
        assert got[step] == pytest.approx(small[step], rel=1e-5, abs=1e-6), step


def test_an_oom_in_backward_is_agreed_before_the_gradient_reduce_scatter(
    tmp_path: Path, token_data: Path
) -> None:
    run_dir = tmp_path / "oom_backward"
    code, output = train(token_data, run_dir, "inject.oom_backward=2@0", "max_steps=3")
    assert code == 0, output
    assert "injected in backward" in output and "where=another rank" in output
    steps, _ = read_metrics(run_dir)
    assert [steps[s]["microbatch_size"] for s in (1, 2, 3)] == [4, 2, 2]


def test_spike_rolls_back_to_the_checkpoint_and_skips_the_data_window(
    tmp_path: Path, token_data: Path, reference: Path
) -> None:
    run_dir = tmp_path / "spike"
    code, output = train(token_data, run_dir, "inject.nan=2", "inject.spike=7")
    assert code == 0, output
    steps, _ = read_metrics(run_dir)

    # A non-finite loss skips the optimizer step and nothing else.
    (skip,) = events(run_dir, "skip")
    assert skip["step"] == 2 and steps[2]["skipped"] and "non-finite" in skip["reason"]
    assert steps[1]["loss"] == losses(reference)[1]

    # The spike at step 7 returns to the step-6 checkpoint and skips step 7's batch.
    (rollback,) = events(run_dir, "rollback")
    assert rollback["step"] == 7 and rollback["to_step"] == 6 and "spike" in rollback["reason"]
    assert rollback["skipped_from"]["samples_seen"] == 6 * 8
    assert rollback["skipped_to"]["samples_seen"] == 7 * 8
    assert [steps[s]["samples_seen"] for s in range(7, 11)] == [8 * (s + 1) for s in range(7, 11)]
    assert max(steps) == 10 and all(steps[s]["loss"] < 10 for s in steps if s != 2)


def test_too_many_rollbacks_end_the_run_with_an_error(tmp_path: Path, token_data: Path) -> None:
    run_dir = tmp_path / "give_up"
    code, output = train(
        token_data, run_dir, "inject.spike=5", "guard.max_rollbacks=0", "max_steps=6", nproc=0
    )
    assert code != 0
    (give_up,) = events(run_dir, "give_up")
    assert give_up["step"] == 5


def test_a_hung_rank_dumps_stacks_exits_and_torchrun_restarts_and_resumes(
    tmp_path: Path, token_data: Path
) -> None:
    run_dir = tmp_path / "hang"
    code, output = train(
        token_data, run_dir, "inject.hang=5@1", "watchdog_timeout=4", restarts=1, timeout=180
    )
    assert code == 0, output  # the restarted attempt finished the run
    dump = (run_dir / "watchdog-rank1.log").read_text()
    assert "watchdog: no progress" in dump and "in step 5" in dump
    assert "time.sleep" in dump or "pretrain.py" in dump  # the hung frame is in the stack
    assert f"exit {EXIT_CODE}" in output
    (resume,) = events(run_dir, "resume")
    assert resume["step"] == 3
    steps, _ = read_metrics(run_dir)
    assert sorted(steps) == list(range(1, 11))


def test_an_oom_in_the_optimizer_step_rolls_back_and_replays_the_same_steps(
    tmp_path: Path, token_data: Path, reference: Path
) -> None:
    run_dir = tmp_path / "oom_optimizer"
    # Step 5 on rank 1 only: its parameters are already updated when the error comes.
    code, output = train(token_data, run_dir, "inject.oom_optimizer=5@1")
    assert code == 0, output
    assert "injected in the optimizer step" in output
    assert "where=optimizer step on another rank" in output  # rank 0 agreed
    (rollback,) = events(run_dir, "rollback")
    assert rollback["step"] == 5 and rollback["to_step"] == 3
    assert "optimizer step" in rollback["reason"]
    # The replayed steps 4-5 see the same data from the same state: the reference's losses.
    assert losses(run_dir) == losses(reference)
    steps, _ = read_metrics(run_dir)
    assert [steps[s]["samples_seen"] for s in range(1, 11)] == [8 * s for s in range(1, 11)]
