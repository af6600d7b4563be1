"""Per-step metrics and events: one JSON line each in run_dir/metrics.jsonl, and the console,
and optionally TensorBoard scalars in run_dir/tensorboard."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError

# The step record's fields that become TensorBoard scalars, under "train/".
SCALARS = (
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "peak_mem_gb",
    "data_wait_s",
    "step_time_s",
    "microbatch_size",
)
# Dense bf16 peak FLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The peak FLOP/s MFU is measured against: the config's, else the GPU's from its name."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on GPU, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class MetricsLog:
    """Appends step records and events to ``metrics.jsonl`` (rank 0) and prints them.

    A resumed run appends to the same file, so a step may appear twice; the later line wins
    (``trainer.plot`` and the tests read it that way). Events carry an ``event`` key.
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, tensorboard: bool = False):
        self.rank = rank
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = None
        self.board = None
        if rank == 0:
            _drop_torn_line(self.path)
            self.file = open(self.path, "a")
            if tensorboard:
                self.board = TensorBoardLog(Path(run_dir) / "tensorboard")

    def step(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        # The time orders lines of several machines' files (read_metrics of several run_dirs).
        self._write({**record, "time": round(time.time(), 3)})
        if self.board is not None:
            self.board.step(record)
        print(console_line(record), flush=True)

    def event(self, kind: str, step: int, everywhere: bool = False, **fields: Any) -> None:
        """Log an event (rank 0's, or this rank's too when ``everywhere``)."""
        record = {"event": kind, "step": step, "time": round(time.time(), 3), **fields}
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        if self.file is not None:
            self._write(record)
        if self.board is not None:
            self.board.event(record)
        if self.file is not None or everywhere:
            print(
                f"[rank {self.rank}] event {kind} at step {step}: {text}",
                file=sys.stderr,
                flush=True,
            )

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


class TensorBoardLog:
    """The same step records and events as TensorBoard scalars (``tensorboard: true``):
    ``train/<field>`` per step, and ``events/<kind>`` = 1 at each event's step, with the
    event's JSON line as text under ``events``."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tensorboard: true needs the tensorboard package "
                "(pip install 'streamshards[tensorboard]'), or set tensorboard=false"
            ) from None
        self.writer = SummaryWriter(str(folder))

    def step(self, record: dict[str, Any]) -> None:
        for name in SCALARS:
            if record.get(name) is not None:
                self.writer.add_scalar(f"train/{name}", record[name], record["step"])
        self.writer.flush()

    def event(self, record: dict[str, Any]) -> None:
        self.writer.add_scalar(f"events/{record['event']}", 1, record["step"])
        self.writer.add_text("events", json.dumps(record, allow_nan=True), record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def console_line(r: dict[str, Any]) -> str:
    """One readable line per step."""
    mfu = f" mfu {r['mfu'] * 100:4.1f}%" if r.get("mfu") is not None else ""
    return (
        f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
        f"gnorm {_num(r['grad_norm'])} | {r['tokens_per_s']:,.0f} tok/s{mfu} | "
        f"data {r['data_wait_s'] * 1000:.0f} ms | mem {r['peak_mem_gb']:.2f} GB | "
        f"mb {r['microbatch_size']}"
    )


def _drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline: a record torn by a killed process."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _num(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else str(x)


def read_metrics(*run_dirs: str | os.PathLike) -> tuple[dict[int, dict], list[dict]]:
    """(last record of each step, all events) from ``run_dir/metrics.jsonl``.

    With several run folders (one per machine: rank 0 writes to its own, and may move between
    machines on a restart), their lines are merged by ``time``, so the latest line of a step
    wins whichever machine wrote it; a folder without the file never held rank 0.
    """
    if not run_dirs:
        raise TypeError("read_metrics needs at least one run folder")
    paths = [Path(run_dir) / "metrics.jsonl" for run_dir in run_dirs]
    if len(paths) == 1:
        lines = _read_lines(paths[0])
    else:
        found = [path for path in paths if path.exists()]
        if not found:
            raise FileNotFoundError(f"no metrics.jsonl in {', '.join(map(str, run_dirs))}")
        lines = sorted((line for path in found for line in _read_lines(path)), key=_time)
    steps: dict[int, dict] = {}
    events: list[dict] = []
    for _, record in lines:
        if "event" in record:
            events.append(record)
        else:
            steps[record["step"]] = record
    return dict(sorted(steps.items())), events


def _read_lines(path: Path) -> list[tuple[str, dict]]:
    """(where, record) of every complete line of ``path``; a last line without its newline
    (being written, or torn by a killed process) is not a record yet."""
    lines = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip() or not line.endswith("\n"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not JSON ({error})") from None
            lines.append((f"{path}:{line_number}", record))
    return lines


def _time(line: tuple[str, dict]) -> float:
    where, record = line
    if "time" not in record:
        raise ValueError(f"{where}: no time, so it cannot be merged with other machines' lines")
    return record["time"]
