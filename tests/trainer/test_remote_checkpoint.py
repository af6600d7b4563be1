"""Checkpoints in object storage (checkpoint.remote) against moto's S3 server: exact resume
from the bucket, a checkpoint killed mid-upload is never loaded, keep_last holds there, and
uploads run beside training."""

from __future__ import annotations

import random
import time
from pathlib import Path

import boto3
import pytest
from trainer_helpers import command, events, kill_all, losses, start, train, wait_for_step

from trainer.config import ConfigError, load_config
from trainer.faults import SLOW_UPLOAD_S


def bucket_keys(bucket: str, prefix: str) -> list[str]:
    """Every object key under ``prefix/``, relative to it."""
    pages = (
        boto3.client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=f"{prefix}/")
    )
    return sorted(o["Key"][len(prefix) + 1 :] for p in pages for o in p.get("Contents", []))


def markers(bucket: str, prefix: str) -> list[int]:
    """Steps of the complete checkpoints: their ``step_N.COMPLETE`` objects."""
    keys = bucket_keys(bucket, prefix)
    return [int(k[5:13]) for k in keys if k.endswith(".COMPLETE") and "/" not in k]


def test_sigkill_then_resume_from_the_bucket_on_an_empty_disk_gives_identical_losses(
    tmp_path: Path, token_data: Path, reference: Path, s3_server, s3_bucket: str
) -> None:
    remote = (f"checkpoint.remote=s3://{s3_bucket}/run", "doctor=false")
    kill_after = random.Random().randint(4, 9)
    run_dir = tmp_path / "run"
    proc = start(command(token_data, run_dir, *remote), tmp_path / "killed.log")
    wait_for_step(proc, run_dir, kill_after)
    # The upload runs beside training: on a loaded machine the first checkpoint may still be
    # going up at the chosen step, so the kill waits for one to be complete in the bucket.
    deadline = time.monotonic() + 60
    while not markers(s3_bucket, "run") and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_all(proc)
    reached = max(losses(run_dir))
    saved = markers(s3_bucket, "run")
    assert saved and max(saved) <= reached, f"killed after step {reached}, bucket has {saved}"

    # Another machine: nothing on its disk, only the bucket.
    fresh = tmp_path / "fresh"
    before = s3_server.gets(f"/{s3_bucket}/run/")
    code, output = train(token_data, fresh, *remote)
    assert code == 0, output
    (resume,) = events(fresh, "resume")
    assert resume["step"] == max(saved)
    assert resume["checkpoint"] == f"s3://{s3_bucket}/run/step_{max(saved):08d}"
    expected = losses(reference)
    assert losses(fresh) == {s: expected[s] for s in range(max(saved) + 1, 11)}

    # Each rank fetched its own DCP file, and rank 0's, which holds the replicated values
    # (AdamW's step counters); both fetched the metadata and the trainer state.
    folder = f"/{s3_bucket}/run/step_{max(saved):08d}"
    fetched = s3_server.gets(folder) - before
    assert {k: n for k, n in fetched.items() if k.endswith(".distcp")} == {
        f"{folder}/__0_0.distcp": 2,
        f"{folder}/__1_0.distcp": 1,
    }
    assert fetched[f"{folder}/.metadata"] == fetched[f"{folder}/trainer.json"] == 2


def test_a_checkpoint_killed_mid_upload_is_never_loaded_and_keep_last_holds_in_the_bucket(
    tmp_path: Path, token_data: Path, reference: Path, s3_bucket: str
) -> None:
    remote = (f"checkpoint.remote=s3://{s3_bucket}/run", "doctor=false")
    run_dir = tmp_path / "run"
    faults = ("inject.slow_upload=3", "inject.kill_in_upload=6@0")
    code, output = train(token_data, run_dir, *remote, *faults)
    assert code != 0, output
    keys = bucket_keys(s3_bucket, "run")
    assert markers(s3_bucket, "run") == [3], keys
    assert "step_00000006/__0_0.distcp" in keys and "step_00000006/trainer.json" not in keys

    # The upload of step 3 was held SLOW_UPLOAD_S: training went on (that save stalled only
    # for the local write), and the save at step 6 waited for it (one upload in flight).
    saves = {e["step"]: e for e in events(run_dir, "checkpoint")}
    assert saves[3]["ckpt_stall_s"] < SLOW_UPLOAD_S / 2, saves
    assert saves[6]["time"] - saves[3]["time"] >= SLOW_UPLOAD_S - 0.05, saves

    # Resumed on one process from step 3: DCP reads both ranks' files and reshards them.
    code, output = train(token_data, run_dir, *remote, nproc=0)
    assert code == 0, output
    (resume,) = events(run_dir, "resume")
    assert (resume["step"], resume["saved_world_size"], resume["world_size"]) == (3, 2, 1)
    expected, resumed = losses(reference), losses(run_dir)
    assert [resumed[s] for s in range(1, 4)] == [expected[s] for s in range(1, 4)]
    for step in range(4, 11):  # another world size: equal to the rounding of the sums
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step

    # keep_last=2: of the saves at 3, 6 (the killed one, saved again), 9 and 10 only the
    # last two remain, whole, and nothing else.
    names = [".metadata", "__0_0.distcp", "rng-rank0.json", "trainer.json"]
    kept = [f"step_{step:08d}/{name}" for step in (9, 10) for name in names]
    assert bucket_keys(s3_bucket, "run") == sorted(
        [*kept, "step_00000009.COMPLETE", "step_00000010.COMPLETE"]
    )


def test_a_missing_bucket_or_a_url_without_a_bucket_is_a_config_error(
    tmp_path: Path, token_data: Path, s3_server
) -> None:
    with pytest.raises(ConfigError, match="checkpoint.remote must be an s3://BUCKET/PREFIX"):
        load_config("tiny", ["data.local=x", "checkpoint.remote=s3:///run"])

    missing = "checkpoint.remote=s3://no-such-bucket/run"
    code, output = train(token_data, tmp_path / "run", missing, "doctor=false", nproc=0)
    assert code == 2, output
    assert output.strip().splitlines()[-1] == (
        "trainer: checkpoint.remote: s3://no-such-bucket/run: not found "
        "(NoSuchBucket: The specified bucket does not exist)"
    )
