"""A rank that dies mid-run makes the survivor exit within the watchdog timeout (T7).

Two torchrun agents, one rank each, as two nodes would run them: the survivor's agent is
not the dead rank's, so nothing but the survivor itself can end its wait in a collective.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_helpers import BASE_OVERRIDES, children, kill_all, start, wait_for_step

from trainer.watchdog import EXIT_CODE

WATCHDOG_TIMEOUT = 4.0
MARGIN = 10.0  # a step in flight, the watchdog's poll, torchrun noticing the exit


def start_node(data: Path, run_dir: Path, node_rank: int, port: int) -> subprocess.Popen:
    """One agent of a 2-node static rendezvous on 127.0.0.1, training with one rank."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "--nproc_per_node=1",
        "--max-restarts=0",
    ]
    args = [
        "tiny",
        f"data.local={data}",
        f"run_dir={run_dir}",
        *BASE_OVERRIDES,
        "max_steps=100000",
        "save_interval=100000",
        f"watchdog_timeout={WATCHDOG_TIMEOUT}",
    ]
    log = run_dir.with_name(f"{run_dir.name}.node{node_rank}.log")
    return start([*launcher, "-m", "trainer.pretrain", *args], log)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_until_node_dies(tmp_path: Path, data: Path, sig: int) -> tuple[float, int, str]:
    """Train on two nodes, send ``sig`` to node 1's agent and rank; returns the seconds node
    0 took to exit after it, node 0's exit code and its output."""
    run_dir = tmp_path / "run"
    port = free_port()
    nodes = [start_node(data, run_dir, rank, port) for rank in (0, 1)]
    try:
        wait_for_step(nodes[0], run_dir, 3)
        for pid in children(nodes[1].pid):
            os.kill(pid, sig)
        nodes[1].send_signal(sig)
        killed = time.monotonic()
        code = nodes[0].wait(timeout=WATCHDOG_TIMEOUT + 60)
        took = time.monotonic() - killed
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_all(node)
    return took, code, run_dir.with_name("run.node0.log").read_text()


# SIGKILL: a crashed rank whose machine lives on. gloo does not fail the survivor's pending
# all-reduce when the peer's connection closes; it would wait for the process group timeout.
# SIGSTOP: a node that stops answering with its connections open (a power loss, a network
# partition). In both, only the survivor's watchdog ends the wait.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_a_dead_node_makes_the_survivor_dump_stacks_and_exit_within_the_watchdog_timeout(
    tmp_path: Path, token_data: Path, sig: signal.Signals
) -> None:
    took, code, output = run_until_node_dies(tmp_path, token_data, sig)
    assert code != 0 and f"exitcode  : {EXIT_CODE}" in output, output
    assert took < WATCHDOG_TIMEOUT + MARGIN, output
    dump = (tmp_path / "run" / "watchdog-rank0.log").read_text()
    assert "watchdog: no progress" in dump and "on rank 0 in step" in dump
    assert "distributed_c10d.py" in dump  # the survivor was waiting in a collective
