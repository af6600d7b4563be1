"""Launch real trainer processes (torchrun or one plain process), kill them, read their metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from streamshards import ShardWriter
from trainer.metrics import read_metrics

SEQ_LEN = 32
VOCAB = 500

# The tiny config shrunk further: two blocks of width 64 over 32 tokens, 8 samples a step.
BASE_OVERRIDES = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    f"model.seq_len={SEQ_LEN}",
    "global_batch_size=8",
    "max_steps=10",
    "save_interval=3",
    "keep_last=2",
    "optim.warmup_steps=2",
    "optim.decay_steps=10",
    "deterministic=true",
    "watchdog_timeout=60",
    "data.num_workers=1",
    "guard.min_history=3",
]


def write_token_data(folder: Path, count: int = 400) -> Path:
    """Token rows with a learnable pattern (arithmetic sequences mod VOCAB), in several shards."""
    rng = np.random.default_rng(0)
    columns = {"tokens": f"ndarray:uint16:{SEQ_LEN + 1}"}
    provenance = {"tokenizer": {"vocab_size": VOCAB}}
    with ShardWriter(folder, columns, size_limit="8KB", provenance=provenance) as writer:
        for _ in range(count):
            start, stride = rng.integers(0, VOCAB), rng.integers(1, 5)
            writer.write({"tokens": (start + stride * np.arange(SEQ_LEN + 1)) % VOCAB})
    return folder


def command(data: Path, run_dir: Path, *overrides: str, nproc: int = 2, restarts: int = 0):
    """The trainer command line: torchrun with ``nproc`` ranks, or one plain process if 0."""
    args = ["tiny", f"data.local={data}", f"run_dir={run_dir}", *BASE_OVERRIDES, *overrides]
    if nproc == 0:
        return [sys.executable, "-m", "trainer.pretrain", *args]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",  # a fresh c10d rendezvous on a free port, renewed on each restart
        f"--max-restarts={restarts}",
        "-m",
        "trainer.pretrain",
    ]
    return launcher + args


def start(cmd: list[str], log: Path, new_session: bool = False) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``log``; ``new_session``: in a process group of its
    own, like a launcher on a machine of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = open(log, "w")
    return subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=new_session
    )


def train(
    data: Path,
    run_dir: Path,
    *overrides: str,
    nproc: int = 2,
    restarts: int = 0,
    timeout: float = 120,
) -> tuple[int, str]:
    """Run the trainer to the end: (exit code, combined output)."""
    log = run_dir.with_name(run_dir.name + f".{time.monotonic_ns()}.log")
    proc = start(command(data, run_dir, *overrides, nproc=nproc, restarts=restarts), log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise
    return code, log.read_text()


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> int:
    """Poll metrics.jsonl until a step >= ``step`` is logged; returns the last step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited with {proc.returncode} before step {step}")
        if (run_dir / "metrics.jsonl").exists():
            steps, _ = read_metrics(run_dir)
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found += [int(x) for x in text.split()]
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children before grandchildren (Linux /proc)."""
    found, frontier = [], children(pid)
    while frontier:
        found += frontier
        frontier = [grandchild for child in frontier for grandchild in children(child)]
    return found


def kill_machine(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher's process group and the group of every process below it (workers
    and data-loader workers each lead their own), as when the machine is lost."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def kill_all(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill the launcher and every rank with its data-loader workers (each rank leads its own
    session under torchrun), like a machine failure."""
    for child in children(proc.pid):
        try:
            os.killpg(child, sig)
        except (ProcessLookupError, PermissionError):
            os.kill(child, sig)
    proc.send_signal(sig)
    proc.wait(timeout=30)


def losses(run_dir: Path) -> dict[int, float]:
    steps, _ = read_metrics(run_dir)
    return {step: record["loss"] for step, record in steps.items()}


def events(run_dir: Path, kind: str) -> list[dict]:
    _, found = read_metrics(run_dir)
    return [e for e in found if e["event"] == kind]
