"""The node doctor in real 2-rank torchrun launches (gloo): a healthy run passes, and a bad
dataset, a read-only checkpoint folder or a hung all-reduce fails naming the rank and check."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import torch.distributed as dist
from trainer_helpers import BASE_OVERRIDES, command, kill_all, start

from trainer.doctor import (
    CHECKS,
    CLOCK_TOLERANCE_S,
    CONFIG_ERROR,
    EXIT_CODE,
    INJECT_ENV,
    _folder_bytes,
    report,
)

# watchdog_timeout, the doctor's limit for each collective: generous for healthy ranks on a
# busy machine, short where a test waits for it to pass.
LIMIT = 10
HANG_LIMIT = 2


def doctor_args(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        "-m",
        "trainer.doctor",
        "tiny",
        f"data.local={data}",
        f"run_dir={run_dir}",
        *BASE_OVERRIDES,
        f"watchdog_timeout={LIMIT}",
        *overrides,
    ]


def run(cmd: list[str], log: Path) -> tuple[int, str]:
    """Run ``cmd`` to the end: (exit code, combined output)."""
    proc = start(cmd, log)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise
    return code, log.read_text()


def doctor(tmp_path: Path, data: Path, *overrides: str) -> tuple[int, str]:
    """The doctor under one torchrun with two ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd = [*launcher, "--standalone", *doctor_args(data, tmp_path / "run", *overrides)]
    return run(cmd, tmp_path / "doctor.log")


def statuses(output: str) -> dict[int, dict[str, str]]:
    """The status grid of the table: {rank: {check: status}}."""
    grid = {}
    for line in output.splitlines():
        cells = line.split()
        if len(cells) == 2 + len(CHECKS) and cells[0].isdigit():
            grid[int(cells[0])] = dict(zip(CHECKS, cells[2:]))
    return grid


def test_a_healthy_two_rank_launch_passes_every_check(tmp_path: Path, token_data: Path) -> None:
    code, output = doctor(tmp_path, token_data)
    assert code == 0, output
    healthy = {**dict.fromkeys(CHECKS, "ok"), "gpu-memory": "skip"}  # no GPU: skipped
    assert statuses(output) == {0: healthy, 1: healthy}, output
    assert "doctor: all checks passed (2 rank(s))" in output
    assert "400 samples; sample 0 decodes (tokens: uint16 (33,))" in output
    assert re.search(r"sum correct in [\d.]+ ms; bus bandwidth [\d.]+ [KMG]iB/s", output)
    assert "versions    rank 0: ok python" in output and "torch" in output


def test_a_node_without_its_dataset_and_with_other_versions_fails_naming_that_rank(
    tmp_path: Path, token_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two agents as two nodes would run them. Node 1's data folder is not mounted, and its
    # Python finds another zstandard distribution first (an image built at another time).
    other = tmp_path / "other-site" / "zstandard-0.0.1.dist-info"
    other.mkdir(parents=True)
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: zstandard\nVersion: 0.0.1\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = []
    for node_rank, data in ((0, token_data), (1, tmp_path / "not-mounted")):
        if node_rank == 1:
            path = os.pathsep.join(filter(None, [str(other.parent), os.environ.get("PYTHONPATH")]))
            monkeypatch.setenv("PYTHONPATH", path)
        launcher = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"),
            *(f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"),
        ]
        log = tmp_path / f"node{node_rank}.log"
        nodes.append((start([*launcher, *doctor_args(data, tmp_path / "run")], log), log))
    codes = [proc.wait(timeout=120) for proc, _ in nodes]
    output = nodes[0][1].read_text()
    assert codes[0] != 0 and codes[1] != 0, output
    for _, log in nodes:
        assert f"exitcode  : {EXIT_CODE}" in log.read_text()
    grid = statuses(output)
    assert [grid[rank]["dataset"] for rank in (0, 1)] == ["ok", "FAIL"], output
    assert [grid[rank]["versions"] for rank in (0, 1)] == ["ok", "FAIL"], output
    assert f"rank 1: FAIL data.local={tmp_path / 'not-mounted'}: no dataset index" in output
    assert "rank 1: FAIL zstandard 0.0.1 (rank 0: " in output
    assert "doctor: FAIL: dataset on rank 1; versions on rank 1 (2 rank(s))" in output


def make_read_only(folder: Path) -> None:
    """No one may create files in ``folder``; root ignores modes, so it is made immutable."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"running as root where chattr +i fails: {done.stderr.decode()}")


def test_a_read_only_checkpoint_folder_fails_on_every_rank_as_a_config_error(
    tmp_path: Path, token_data: Path
) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    make_read_only(checkpoints)
    try:
        code, output = doctor(tmp_path, token_data)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(checkpoints)], check=True)
        checkpoints.chmod(0o755)
    assert code != 0 and f"exitcode  : {CONFIG_ERROR}" in output, output
    assert {rank: row["checkpoint"] for rank, row in statuses(output).items()} == {
        0: "FAIL",
        1: "FAIL",
    }
    assert f"rank 0: FAIL cannot write {checkpoints}:" in output
    assert "doctor: FAIL: checkpoint on ranks 0, 1; on every rank alike: a config error" in output


def test_a_remote_checkpoint_location_must_take_an_object(
    tmp_path: Path, token_data: Path, s3_bucket: str
) -> None:
    # One process (a group of one) against the local S3 server: a bucket, then a missing one.
    for name, bucket in (("good", s3_bucket), ("missing", "no-such-bucket")):
        args = doctor_args(token_data, tmp_path / name, f"checkpoint.remote=s3://{bucket}/run")
        code, output = run([sys.executable, *args], tmp_path / f"{name}.log")
        row = statuses(output)[0]["checkpoint"]
        if name == "good":
            assert code == 0 and row == "ok", output
            assert f"s3://{bucket}/run and {tmp_path / name / 'checkpoints'} writable" in output
            listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="run/")
            assert listed["KeyCount"] == 0  # the probe object was removed
        else:
            assert code == CONFIG_ERROR and row == "FAIL", output  # the one rank there is
            assert f"rank 0: FAIL cannot write s3://{bucket}/run:" in output


def test_a_hung_all_reduce_is_reported_naming_the_rank_within_the_limit(
    tmp_path: Path, token_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INJECT_ENV, "hang_allreduce@1")
    started = time.monotonic()
    code, output = doctor(tmp_path, token_data, f"watchdog_timeout={HANG_LIMIT}")
    took = time.monotonic() - started
    assert code != 0 and f"exitcode  : {EXIT_CODE}" in output, output
    grid = statuses(output)
    assert grid[0]["all-reduce"] == "wait" and grid[1]["all-reduce"] == "FAIL", output
    assert grid[1]["dataset"] == "ok"  # the hung rank's own checks were reported before
    assert f"no result within {HANG_LIMIT} s; rank 1 never started it" in output
    assert "doctor: FAIL: all-reduce on rank 1 (2 rank(s))" in output
    assert took < 2 * HANG_LIMIT + 30  # the limit twice (all-reduce, reports) and start-up


def test_the_trainer_runs_the_doctor_first_unless_doctor_false(
    tmp_path: Path, token_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INJECT_ENV, "hang_allreduce@1")
    cmd = command(token_data, tmp_path / "a", "max_steps=1", f"watchdog_timeout={HANG_LIMIT}")
    code, output = run(cmd, tmp_path / "a.log")
    assert code != 0 and f"exitcode  : {EXIT_CODE}" in output, output
    assert "doctor: FAIL: all-reduce on rank 1" in output
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # no step was taken

    cmd = command(token_data, tmp_path / "b", "max_steps=1", "doctor=false", nproc=0)
    code, output = run(cmd, tmp_path / "b.log")
    assert code == 0 and "step      1 |" in output, output
    assert "rank  host" not in output and "all checks passed" not in output


def reports(store: dist.Store, failing: dict[str, set[int]], world_size: int = 2) -> None:
    """What ``world_size`` ranks write to the store, with ``failing[check]`` ranks failing."""
    for rank in range(world_size):
        local = {
            name: {"status": "FAIL" if rank in failing.get(name, ()) else "ok", "detail": "x"}
            for name in ("dataset", "checkpoint", "gpu-memory")
        }
        store.set(f"local/{rank}", json.dumps({**local, "host": "n", "versions": {"torch": "2"}}))
        status = "FAIL" if rank in failing.get("all-reduce", ()) else "ok"
        store.set(f"all-reduce/{rank}", json.dumps({"status": status, "detail": "x"}))
        store.set(f"clock/{rank}", "1000.0")


@pytest.mark.parametrize(
    ("failing", "code"),
    [
        ({}, 0),
        ({"dataset": {1}}, EXIT_CODE),  # one node's mount
        ({"dataset": {0, 1}}, CONFIG_ERROR),  # the config's path, wherever it runs
        ({"checkpoint": {0, 1}, "gpu-memory": {0, 1}}, CONFIG_ERROR),
        ({"checkpoint": {0, 1}, "dataset": {1}}, EXIT_CODE),  # and a node as well
        ({"all-reduce": {0, 1}}, EXIT_CODE),  # the network, not the config
    ],
)
def test_the_exit_code_tells_a_config_error_from_a_bad_node(
    failing: dict[str, set[int]], code: int, capsys: pytest.CaptureFixture
) -> None:
    store = dist.HashStore()
    reports(store, failing)
    assert report(store, world_size=2, limit=0.1) == code
    verdict = capsys.readouterr().out.splitlines()[-1]
    for name, ranks in failing.items():
        assert f"{name} on rank{'s' if len(ranks) > 1 else ''} " in verdict


def test_a_clock_past_the_tolerance_fails_that_rank() -> None:
    store = dist.HashStore()
    reports(store, {}, world_size=3)
    store.set("clock/2", repr(1000.0 - 3 * CLOCK_TOLERANCE_S))
    assert report(store, world_size=3, limit=0.1) == EXIT_CODE
    store.set("clock/2", repr(1000.0 + CLOCK_TOLERANCE_S / 2))
    assert report(store, world_size=3, limit=0.1) == 0


def test_counting_the_checkpoint_folder_survives_files_and_folders_going_meanwhile(
    tmp_path: Path,
) -> None:
    """Every rank writes and deletes its probe in the same folder while the others count it:
    a file or folder that goes during the count is not an error (it was one, on a busy CI)."""
    (tmp_path / "kept").write_bytes(b"k" * 100)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            folder = tmp_path / "step"
            folder.mkdir()
            for k in range(20):
                (folder / f"f{k}").write_bytes(b"x")
            for k in range(20):
                (folder / f"f{k}").unlink()
            folder.rmdir()

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        counts = {_folder_bytes(tmp_path) for _ in range(300)}
    finally:
        stop.set()
        worker.join()
    assert min(counts) == 100 and max(counts) <= 120
