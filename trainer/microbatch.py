"""Microbatch size search: halve on CUDA out-of-memory, agreed by every rank, redo the step.

An OOM is raised on one rank at one point of its forward or backward pass while the other
ranks run on toward FSDP's next all-gather or reduce-scatter. If the failing rank simply
stopped, the others would wait in that collective forever. So before each FSDP collective
(each block's forward, the start of its backward, and the end of its backward, before the
gradient reduce-scatter) every rank all-reduces an "out of memory" flag over a side gloo
group. The failing rank contributes 1 from its exception handler; the others see it at
their next agreement point and raise too, so all ranks leave the step having issued the
same FSDP collectives, and redo it with a smaller microbatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule


class OutOfMemoryElsewhere(RuntimeError):
    """Another rank ran out of memory in this step."""


def smaller_microbatch(per_rank_batch: int, current: int) -> int | None:
    """The largest divisor of ``per_rank_batch`` at most half of ``current`` (None: none)."""
    for size in range(current // 2, 0, -1):
        if per_rank_batch % size == 0:
            return size
    return None


def fit_microbatch(saved: int, per_rank_batch: int) -> int:
    """A saved microbatch size, lowered to a divisor of this world size's per-rank batch."""
    size = min(saved, per_rank_batch)
    while per_rank_batch % size:
        size -= 1
    return size


class _CheckInBackward(torch.autograd.Function):
    """Identity whose backward runs an agreement check (placed before FSDP's backward hooks)."""

    @staticmethod
    def forward(ctx, agreement: OomAgreement, x: torch.Tensor) -> torch.Tensor:
        ctx.agreement = agreement
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        ctx.agreement.check()
        return None, grad


class OomAgreement:
    """All-reduces an out-of-memory flag before every FSDP collective of ``blocks``.

    Hooks registered after ``fully_shard`` put a check before each block's all-gather
    (forward pre-hook, prepended), one before its backward all-gather (on its output) and
    one before its reduce-scatter (on its input, after FSDP's own input hook).
    """

    def __init__(self, root: nn.Module, blocks: list[nn.Module]):
        self.group = dist.new_group(backend="gloo")
        self.handles = [root.register_forward_pre_hook(self._before_forward, prepend=True)]
        for block in blocks:
            self.handles += [
                block.register_forward_pre_hook(self._before_forward, prepend=True),
                block.register_forward_pre_hook(self._wrap_input),
                block.register_forward_hook(self._wrap_output),
            ]

    @torch.compiler.disable
    def check(self, failed: bool = False) -> None:
        """Agree with every rank; raise OutOfMemoryElsewhere if another rank failed."""
        flag = torch.tensor([int(failed)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item() and not failed:
            raise OutOfMemoryElsewhere("another rank ran out of memory")

    # The hooks run eagerly even inside a compiled block (``Module.compile`` traces hooks).
    @torch.compiler.disable
    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        self.check()

    @torch.compiler.disable
    def _wrap_input(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        if not x.requires_grad:
            return args
        return (_CheckInBackward.apply(self, x), *rest)

    @torch.compiler.disable
    def _wrap_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _CheckInBackward.apply(self, output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class MicrobatchSearch:
    """Runs a step at the current microbatch size, halving it on an OOM agreed by all ranks.

    ``auto=False`` (a fixed microbatch size from the config) lets an OOM end the run.
    """

    def __init__(self, model: FSDPModule, per_rank_batch: int, size: int, auto: bool, log):
        if per_rank_batch % size:
            raise ValueError(
                f"microbatch_size {size} does not divide the per-rank batch {per_rank_batch}"
            )
        self.model = model
        self.per_rank_batch = per_rank_batch
        self.size = size
        self.auto = auto
        self.log = log
        self.agreement = OomAgreement(model, list(model.blocks)) if auto else None

    def run(self, step: Callable[[int], Any], zero_grad: Callable[[], None]) -> Any:
        """``step(microbatch_size)``, retried with smaller sizes until every rank succeeds."""
        while True:
            try:
                result = step(self.size)
                if self.agreement is not None:
                    self.agreement.check()
                return result
            except (torch.OutOfMemoryError, OutOfMemoryElsewhere) as error:
                if self.agreement is None:
                    raise
                here = isinstance(error, torch.OutOfMemoryError)
                if here:
                    self.agreement.check(failed=True)
                self._recover(zero_grad)
                smaller = smaller_microbatch(self.per_rank_batch, self.size)
                if smaller is None:
                    raise RuntimeError("out of memory with microbatch_size 1") from error
                self.log(
                    "oom",
                    microbatch_size=self.size,
                    new_microbatch_size=smaller,
                    where="this rank" if here else "another rank",
                    error=str(error).splitlines()[0][:200],
                )
                self.size = smaller

    def optimizer_step(self, step: Callable[[], Any]) -> bool:
        """Run ``step()`` (the optimizer's); True if it ran out of memory on any rank.

        A failed step may have updated some parameters and moment buffers already (foreach
        and fused AdamW update them in place, tensor list by tensor list), so it cannot be
        redone in place: the caller rolls back to the latest checkpoint. Every rank agrees
        on the outcome over the side group (no collective runs inside AdamW's step).
        """
        failed = False
        try:
            step()
        except torch.OutOfMemoryError as error:
            if self.agreement is None:
                raise
            failed = True
            self.log("oom", where="optimizer step", error=str(error).splitlines()[0][:200])
        if self.agreement is None:
            return False
        try:
            self.agreement.check(failed)
        except OutOfMemoryElsewhere:
            failed = True
            self.log("oom", where="optimizer step on another rank")
        if failed and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return failed

    def state_dict(self) -> int:
        """The microbatch size found (saved in checkpoints)."""
        return self.size

    def load_state_dict(self, size: int) -> None:
        """Reuse a saved size in ``auto`` mode, fitted to this per-rank batch; a fixed size wins."""
        if self.auto:
            self.size = fit_microbatch(size, self.per_rank_batch)

    def _recover(self, zero_grad: Callable[[], None]) -> None:
        """Drop the failed step's partial gradients and FSDP's per-iteration state."""
        self.model.reset_iter_state()
        zero_grad()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
