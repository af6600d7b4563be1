"""Fault injection for tests: hang, out-of-memory, loss spike or NaN at a chosen step and rank.

Each fault is configured as ``inject.KIND: STEP`` (every rank) or ``STEP@RANK`` and fires
once, in the first launch attempt only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a job
that torchrun restarts runs clean. ``UploadFaults`` acts in a remote checkpoint's upload.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

from trainer.config import ConfigError
from trainer.model import Transformer

KINDS = ("oom", "oom_backward", "oom_optimizer", "spike", "nan", "hang")
SPIKE_FACTOR = 100.0
SLOW_UPLOAD_S = 2.0


def parse_injection(spec: Any, rank: int) -> int | None:
    """The step at which a fault fires on ``rank``, from ``STEP`` or ``STEP@RANK``."""
    if spec is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    step, _, only_rank = str(spec).partition("@")
    try:
        if only_rank and int(only_rank) != rank:
            return None
        return int(step)
    except ValueError:
        raise ConfigError(f"injection {spec!r} is not STEP or STEP@RANK") from None


class Faults:
    """The faults still to fire on this rank."""

    def __init__(self, specs: dict[str, Any], rank: int):
        self.rank = rank
        self.steps = {kind: parse_injection(specs.get(kind), rank) for kind in KINDS}

    def _due(self, kind: str, step: int) -> bool:
        if self.steps[kind] != step:
            return False
        self.steps[kind] = None
        return True

    def before_step(self, step: int, model: Transformer, optimizer: torch.optim.Optimizer) -> float:
        """Fire this step's faults; returns the factor for the step's loss (1, 100 or NaN)."""
        if self._due("hang", step):
            time.sleep(10**6)
        for kind in ("oom", "oom_backward"):
            if self._due(kind, step):
                raise_oom_once(model, step, self.rank, backward=kind == "oom_backward")
        if self._due("oom_optimizer", step):
            raise_oom_after_optimizer_step(optimizer, step, self.rank)
        if self._due("nan", step):
            return float("nan")
        return SPIKE_FACTOR if self._due("spike", step) else 1.0


class UploadFaults:
    """``inject.slow_upload``: the upload of that step's checkpoint starts SLOW_UPLOAD_S late;
    ``inject.kill_in_upload``: the rank is SIGKILLed after its DCP files are up, before its
    RNG object and (rank 0) trainer.json and the COMPLETE marker."""

    def __init__(self, specs: dict[str, Any], rank: int):
        self.slow = parse_injection(specs.get("slow_upload"), rank)
        self.kill = parse_injection(specs.get("kill_in_upload"), rank)

    def before_upload(self, step: int) -> None:
        if step == self.slow:
            time.sleep(SLOW_UPLOAD_S)

    def after_files(self, step: int) -> None:
        if step == self.kill:
            os.kill(os.getpid(), signal.SIGKILL)


def raise_oom_once(model: Transformer, step: int, rank: int, backward: bool) -> None:
    """The next forward of the first block, or the backward of the last, raises a CUDA
    out-of-memory error on this rank."""
    where = "backward" if backward else "forward"

    def raise_error(*args: Any) -> None:
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected in {where} at step {step} on rank {rank})"
        )

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        handle.remove()
        if backward:
            output.register_hook(raise_error)
        else:
            raise_error()

    handle = model.blocks[-1 if backward else 0].register_forward_hook(hook)


def raise_oom_after_optimizer_step(optimizer: torch.optim.Optimizer, step: int, rank: int) -> None:
    """The next ``optimizer.step()`` raises a CUDA out-of-memory error on this rank after it
    has updated the parameters: the worst case, a step that leaves them changed."""

    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        handle.remove()
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected in the optimizer step at step {step} on rank {rank})"
        )

    handle = optimizer.register_step_post_hook(hook)
