"""Node loss and replacement: two elastic torchrun launchers on one machine, one killed, one
started later; the run continues on the world sizes it has and ends with the right losses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import boto3
import pytest
import torch.distributed as dist
from trainer_helpers import (
    BASE_OVERRIDES,
    descendants,
    events,
    kill_machine,
    losses,
    start,
    train,
)

from trainer.checkpoint import complete_checkpoints
from trainer.fsdp import _attempt_store
from trainer.metrics import read_metrics

MAX_STEPS = 16
# A checkpoint every step: the steps at which the world changes are the checkpoints the run
# resumes from, and the save paces the loop so that the test can stop it between phases.
OVERRIDES = [
    f"max_steps={MAX_STEPS}",
    f"optim.decay_steps={MAX_STEPS}",  # the schedule must not depend on max_steps (reference)
    "save_interval=1",
    "keep_last=3",
    "watchdog_timeout=20",  # bounds a survivor's wait, were a collective not to fail
]
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_command(data: Path, run_dir: Path, port: int, hosts_rendezvous: bool) -> list[str]:
    """One machine's launcher: 1 to 2 nodes of one process each, c10d rendezvous on ``port``
    (hosted by the first machine), short timeouts: a lost node is dropped after ~5 s."""
    rendezvous = (
        f"is_host={str(hosts_rendezvous).lower()},join_timeout=60,last_call_timeout=2,"
        "keep_alive_interval=1,keep_alive_max_attempt=5"
    )
    return [
        sys.executable,
        "-m",
        "trainer.launch",
        "--nnodes=1:2",
        "--nproc_per_node=1",
        "--max-restarts=3",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=elastic-test",
        f"--rdzv-conf={rendezvous}",
        "-m",
        "trainer.pretrain",
        "tiny",
        f"data.local={data}",
        f"run_dir={run_dir}",
        *BASE_OVERRIDES,
        *OVERRIDES,
    ]


def wait_until(
    found: Callable[[], T | None], what: str, nodes: list[subprocess.Popen], timeout: float = 60
) -> T:
    """Poll ``found()`` until it returns a value; fail if a launcher exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value is not None and value is not False:
            return value
        for node in nodes:
            if node.poll() is not None:
                raise AssertionError(f"a launcher exited with {node.returncode} before {what}")
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {timeout} s")


def checkpoint_on(run_dir: Path, world_size: int, after_step: int = 0) -> int | None:
    """The step of a complete checkpoint saved by ``world_size`` ranks after ``after_step``."""
    for step, path in complete_checkpoints(run_dir / "checkpoints"):
        try:
            saved = json.loads((path / "trainer.json").read_text())
        except FileNotFoundError:  # pruned meanwhile
            continue
        if step > after_step and saved["world_size"] == world_size:
            return step
    return None


def resume_on(run_dir: Path, world_size: int) -> dict | None:
    """The latest resume event on ``world_size`` ranks, if any."""
    try:
        found = [e for e in events(run_dir, "resume") if e["world_size"] == world_size]
    except (FileNotFoundError, ValueError):  # not yet written, or a line being written
        return None
    return found[-1] if found else None


def trainer_process(launcher: subprocess.Popen) -> int | None:
    """The pid of the trainer rank a launcher runs now (it runs one)."""
    for pid in descendants(launcher.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"trainer.pretrain" in cmdline and b"trainer.launch" not in cmdline:
            return pid
    return None


def sigterm_pending(pid: int) -> bool:
    """True once a SIGTERM waits for the stopped process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("SigPnd", "ShdPnd") and int(value, 16) & SIGTERM_BIT:
            return True
    return False


def test_node_loss_then_replacement_continues_the_run_with_reference_losses(
    tmp_path: Path, token_data: Path
) -> None:
    run_dir, port = tmp_path / "run", free_port()
    first = start(node_command(token_data, run_dir, port, True), tmp_path / "first.log", True)
    second = start(node_command(token_data, run_dir, port, False), tmp_path / "second.log", True)
    nodes = [first, second]
    try:
        # 1. Two nodes train; once 2 steps are saved the second machine is lost.
        wait_until(lambda: checkpoint_on(run_dir, 2, after_step=1), "2 steps on 2 ranks", nodes)
        kill_machine(second)
        nodes = [first]

        # 2. The survivor's launcher restarts its rank alone, from the latest checkpoint.
        alone = wait_until(lambda: resume_on(run_dir, 1), "a resume on 1 rank", nodes)
        wait_until(
            lambda: checkpoint_on(run_dir, 1, after_step=alone["step"] + 1),
            "two steps on 1 rank",
            nodes,
        )
        # Hold the survivor until the replacement has joined: its launcher then asks the
        # rank to stop (SIGTERM), which saves a checkpoint at the current step and exits.
        survivor = trainer_process(first)
        assert survivor is not None
        os.kill(survivor, signal.SIGSTOP)
        steps, _ = read_metrics(run_dir)
        assert max(steps) < MAX_STEPS, "the run ended before a node could join; raise MAX_STEPS"
        replacement = start(
            node_command(token_data, run_dir, port, False), tmp_path / "replacement.log", True
        )
        nodes = [first, replacement]
        wait_until(lambda: sigterm_pending(survivor), "the rank's stop request", nodes)
        os.kill(survivor, signal.SIGCONT)

        # 3. The world is back to 2 and the run finishes.
        for node in nodes:
            assert node.wait(timeout=90) == 0
    finally:
        for node in [first, second, *nodes]:
            if node.poll() is None:
                kill_machine(node)

    resumes = events(run_dir, "resume")
    # As in the bucket test below: a later restart at the same world size is allowed.
    worlds = [(e["world_size"], e["saved_world_size"]) for e in resumes]
    lost = worlds.index((1, 2))
    alone, rejoined = resumes[lost : lost + 2]
    assert all(w == (2, 2) for w in worlds[lost + 2 :]), worlds
    assert (alone["world_size"], alone["saved_world_size"]) == (1, 2), alone
    assert (rejoined["world_size"], rejoined["saved_world_size"]) == (2, 1), rejoined
    assert alone["step"] < rejoined["step"] < MAX_STEPS
    # The data resumes at the same global sample at each change of the world.
    steps, _ = read_metrics(run_dir)
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    assert [steps[s]["samples_seen"] for s in steps] == [8 * s for s in steps]
    assert rejoined["samples_seen"] == 8 * rejoined["step"]

    # The reference: the same world sizes over the same steps, each part a plain relaunch
    # (torchrun --standalone, or one process) resuming the previous part's last checkpoint.
    # (A second node that joined late adds a restart to the first part; it is followed too.)
    worlds = [resumes[0]["saved_world_size"]] + [e["world_size"] for e in resumes]
    ends = [e["step"] for e in resumes] + [MAX_STEPS]
    reference = tmp_path / "reference"
    for world_size, end in zip(worlds, ends):
        nproc = world_size if world_size > 1 else 0
        code, output = train(token_data, reference, *OVERRIDES, f"max_steps={end}", nproc=nproc)
        assert code == 0, output
    # The same reductions in the same order (two ranks: a + b), so equal bitwise.
    assert losses(run_dir) == losses(reference)


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_shared_torchrun_store_is_prefixed_by_attempt_and_warned_about_on_several_nodes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, nodes: int
) -> None:
    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "3",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(agent_store.port),
        "GROUP_WORLD_SIZE": str(nodes),
        "RANK": "0",
    }.items():
        monkeypatch.setenv(name, value)
    _attempt_store(timedelta(seconds=10)).set("address", b"rank 0")
    assert agent_store.get("trainer/attempt3/address") == b"rank 0"
    assert ("python -m trainer.launch" in capsys.readouterr().err) == (nodes > 1)

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # trainer.launch
    assert _attempt_store(timedelta(seconds=10)) is None


# Rendezvous ranks follow the agents' addresses in sorted order: a machine at LOW_ADDR holds
# rank 0 whenever it is in the world, so the tests choose where rank 0 is, and where it moves.
LOW_ADDR, HIGH_ADDR = "127.0.0.1", "127.0.0.2"


def machine_command(
    data: Path, run_dir: Path, port: int, hosts_rendezvous: bool, addr: str, remote: str
) -> list[str]:
    """``node_command`` for a machine of its own: its address, its local ``run_dir``, and the
    checkpoints in the bucket at ``remote``."""
    command = node_command(data, run_dir, port, hosts_rendezvous)
    command.insert(command.index("trainer.launch") + 1, f"--local-addr={addr}")
    return [*command, f"checkpoint.remote={remote}"]


def bucket_checkpoint(bucket: str, world_size: int, after_step: int = 0) -> int | None:
    """The step of a complete checkpoint in the bucket saved by ``world_size`` ranks after
    ``after_step`` (the newest first)."""
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="run/").get("Contents", [])
    marked = [o["Key"] for o in listed if o["Key"].endswith(".COMPLETE")]
    for key in sorted(marked, reverse=True):
        step = int(key[len("run/step_") : -len(".COMPLETE")])
        try:
            body = s3.get_object(Bucket=bucket, Key=f"run/step_{step:08d}/trainer.json")["Body"]
        except s3.exceptions.NoSuchKey:  # pruned meanwhile
            continue
        if step > after_step and json.loads(body.read())["world_size"] == world_size:
            return step
    return None


def trainer_rank(launcher: subprocess.Popen) -> int | None:
    """The global rank of the trainer process a launcher runs now, if it runs one."""
    pid = trainer_process(launcher)
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if pid else []
    except FileNotFoundError:
        return None
    ranks = [int(v[len(b"RANK=") :]) for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def merged_resume_on(run_dirs: list[Path], world_size: int) -> dict | None:
    """The latest resume event on ``world_size`` ranks in any machine's metrics.jsonl."""
    try:
        _, found = read_metrics(*run_dirs)
    except FileNotFoundError:  # no rank 0 has written yet
        return None
    found = [e for e in found if e["event"] == "resume" and e["world_size"] == world_size]
    return found[-1] if found else None


def test_node_loss_with_local_run_dirs_and_checkpoints_in_a_bucket_moves_rank_0_and_continues(
    tmp_path: Path, token_data: Path, s3_bucket: str
) -> None:
    remote = f"s3://{s3_bucket}/run"
    dirs = [tmp_path / name for name in ("first", "second", "replacement")]
    port = free_port()

    def machine(index: int, hosts: bool, addr: str) -> subprocess.Popen:
        command = machine_command(token_data, dirs[index], port, hosts, addr, remote)
        return start(command, tmp_path / f"{dirs[index].name}.log", True)

    first, second = machine(0, True, HIGH_ADDR), machine(1, False, LOW_ADDR)
    nodes, replacement = [first, second], None
    try:
        # 1. Two machines train, rank 0 on the second; once 2 steps are in the bucket on 2
        # ranks the second machine, and rank 0 with it, is lost.
        wait_until(lambda: bucket_checkpoint(s3_bucket, 2, after_step=1), "2 steps on 2", nodes)
        assert trainer_rank(second) == 0
        kill_machine(second)
        nodes = [first]

        # 2. The survivor restarts alone as rank 0, from the bucket, logging to its run_dir.
        alone = wait_until(lambda: merged_resume_on(dirs[:1], 1), "a resume on 1 rank", nodes)
        wait_until(
            lambda: bucket_checkpoint(s3_bucket, 1, after_step=alone["step"] + 1),
            "two steps on 1 rank",
            nodes,
        )
        survivor = trainer_process(first)
        assert survivor is not None
        os.kill(survivor, signal.SIGSTOP)
        steps, _ = read_metrics(*dirs[:2])
        assert max(steps) < MAX_STEPS, "the run ended before a node could join; raise MAX_STEPS"

        # 3. A replacement with an empty disk joins; rank 0 moves to it and the world is 2.
        replacement = machine(2, False, LOW_ADDR)
        nodes = [first, replacement]
        wait_until(lambda: sigterm_pending(survivor), "the rank's stop request", nodes)
        os.kill(survivor, signal.SIGCONT)
        for node in nodes:
            assert node.wait(timeout=90) == 0
    finally:
        for node in [first, second, *nodes]:
            if node.poll() is None:
                kill_machine(node)

    # Rank 0 wrote its lines on each machine in turn; merged by time, the run reads whole.
    assert all((run_dir / "metrics.jsonl").exists() for run_dir in dirs)
    steps, found = read_metrics(*dirs)
    resumes = [e for e in found if e["event"] == "resume"]
    # A loaded machine may add a restart at the same world size (a slow heartbeat starts a
    # new round); it resumes from a complete checkpoint and is checked by the losses below.
    worlds = [(e["world_size"], e["saved_world_size"]) for e in resumes]
    lost = worlds.index((1, 2))
    alone, rejoined = resumes[lost : lost + 2]
    assert all(w == (2, 2) for w in worlds[lost + 2 :]), worlds
    assert (alone["world_size"], alone["saved_world_size"]) == (1, 2), alone
    assert (rejoined["world_size"], rejoined["saved_world_size"]) == (2, 1), rejoined
    assert alone["step"] < rejoined["step"] < MAX_STEPS
    assert alone["checkpoint"] == f"{remote}/step_{alone['step']:08d}"
    assert rejoined in events(dirs[2], "resume") and max(read_metrics(dirs[2])[0]) == MAX_STEPS
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    assert [steps[s]["samples_seen"] for s in steps] == [8 * s for s in steps]
    # No machine's disk held a checkpoint: only the bucket did.
    assert not any(complete_checkpoints(run_dir / "checkpoints") for run_dir in dirs)

    # The reference, as in the shared-run_dir test: plain relaunches over the same world
    # sizes and steps, with local checkpoints. Equal bitwise.
    worlds = [resumes[0]["saved_world_size"]] + [e["world_size"] for e in resumes]
    ends = [e["step"] for e in resumes] + [MAX_STEPS]
    reference = tmp_path / "reference"
    for world_size, end in zip(worlds, ends):
        nproc = world_size if world_size > 1 else 0
        code, output = train(token_data, reference, *OVERRIDES, f"max_steps={end}", nproc=nproc)
        assert code == 0, output
    assert {s: r["loss"] for s, r in steps.items()} == losses(reference)


def test_metrics_of_several_machines_merge_by_time_and_the_latest_line_of_a_step_wins(
    tmp_path: Path,
) -> None:
    lost, survivor, unused = tmp_path / "lost", tmp_path / "survivor", tmp_path / "unused"
    for folder in (lost, survivor, unused):
        folder.mkdir()
    lines = {
        lost: [
            {"step": 1, "loss": 3.0, "time": 10.0},
            {"step": 2, "loss": 2.5, "time": 11.0},  # after the last checkpoint: done again
            {"event": "checkpoint", "step": 1, "time": 10.5},
        ],
        survivor: [
            {"event": "resume", "step": 1, "time": 20.0},
            {"step": 2, "loss": 2.4, "time": 21.0},
        ],
    }
    for folder, records in lines.items():
        text = "".join(json.dumps(r) + "\n" for r in records)
        (folder / "metrics.jsonl").write_text(text + '{"step": 3, "lo')  # torn by a kill
    steps, found = read_metrics(survivor, lost, unused)
    assert {s: r["loss"] for s, r in steps.items()} == {1: 3.0, 2: 2.4}
    assert [e["event"] for e in found] == ["checkpoint", "resume"]

    (lost / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    with pytest.raises(ValueError, match=r"lost/metrics.jsonl:1: no time"):
        read_metrics(survivor, lost)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
        read_metrics(unused, tmp_path)


def test_a_machine_lost_while_its_upload_is_held_does_not_hang_rank_0_waiting_for_its_files(
    tmp_path: Path, token_data: Path, s3_bucket: str
) -> None:
    remote = f"s3://{s3_bucket}/run"
    port = free_port()
    # Rank 0 on the first machine; rank 1's upload of step 2 is held SLOW_UPLOAD_S, so both
    # ranks go on to step 3 and its save, where rank 0 waits for rank 1's files of step 2.
    held = ["inject.slow_upload=2@1", "max_steps=6"]

    def machine(name: str, hosts: bool, addr: str) -> subprocess.Popen:
        command = machine_command(token_data, tmp_path / name, port, hosts, addr, remote)
        return start([*command, *held], tmp_path / f"{name}.log", True)

    first, second = machine("first", True, LOW_ADDR), machine("second", False, HIGH_ADDR)
    nodes = [first, second]
    try:
        wait_until(lambda: trainer_rank(second) == 1 or None, "rank 1 on the second", nodes)
        wait_until(lambda: 3 in merged_steps([tmp_path / "first"]) or None, "step 3 logged", nodes)
        kill_machine(second)
        nodes = [first]
        keys = bucket_keys(s3_bucket)
        assert "run/step_00000002/rng-rank1.json" not in keys, "the upload was not held"
        assert "run/step_00000002.COMPLETE" not in keys
        # Rank 0 leaves its wait at the lost peer; its agent restarts it alone, from step 1.
        assert first.wait(timeout=60) == 0
    finally:
        for node in (first, second):
            if node.poll() is None:
                kill_machine(node)
    # (A second machine that joined late adds a restart before; the last one is the loss's.)
    alone = events(tmp_path / "first", "resume")[-1]
    assert (alone["step"], alone["world_size"]) == (1, 1), alone
    assert max(merged_steps([tmp_path / "first"])) == 6


def merged_steps(run_dirs: list[Path]) -> dict[int, dict]:
    """The step records of the machines' metrics.jsonl so far ({} before the first)."""
    try:
        return read_metrics(*run_dirs)[0]
    except FileNotFoundError:
        return {}


def bucket_keys(bucket: str) -> list[str]:
    """Every key in ``bucket`` (one page: the tests' buckets are small)."""
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])
    return [o["Key"] for o in listed]
