"""Pretrain a decoder-only transformer with FSDP2 on token shards.

    torchrun --nproc_per_node=N -m trainer.pretrain CONFIG.yaml [dotted.key=value ...]
    python -m trainer.pretrain tiny data.local=shards/ run_dir=runs/tiny   # one process

CONFIG is a YAML file or a bundled name (tiny, gpt-125m, ...). A relaunch with the same
run_dir resumes from its latest checkpoint. See docs/TRAINER.md.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from streamshards import StreamingDataLoader, StreamingDataset
from streamshards.util import atomic_write
from trainer.checkpoint import CheckpointStore, Stateful, open_checkpoints
from trainer.config import ConfigError, dump, load_config
from trainer.doctor import examine_or_exit
from trainer.faults import Faults
from trainer.fsdp import init_distributed, shard_model
from trainer.guards import ROLLBACK, SKIP, STEP, SpikeGuard
from trainer.metrics import MetricsLog, peak_flops, peak_memory_gb
from trainer.microbatch import MicrobatchSearch
from trainer.model import ModelConfig, Transformer, count_params, flops_per_token
from trainer.watchdog import Watchdog

EXIT_TOO_MANY_ROLLBACKS = 76


def lr_at(step: int, optim: dict[str, Any], max_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr``."""
    warmup, peak, floor = optim["warmup_steps"], optim["lr"], optim["min_lr"]
    decay_steps = optim["decay_steps"] or max_steps
    if step <= warmup:
        return peak * step / max(warmup, 1)
    progress = min((step - warmup) / max(decay_steps - warmup, 1), 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def forward_backward(
    model: Transformer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    microbatch_size: int,
    global_tokens: int,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """Accumulate gradients of sum(token losses) / global_tokens over this rank's batch.

    Dividing by the global batch's token count (not the microbatch's) makes the gradient
    the same whatever the split into ranks and microbatches; FSDP sums it over ranks.
    Gradients are reduce-scattered once, after the last microbatch.
    """
    count = inputs.shape[0] // microbatch_size
    total = torch.zeros((), device=inputs.device)
    for i in range(count):
        rows = slice(i * microbatch_size, (i + 1) * microbatch_size)
        model.set_requires_gradient_sync(i == count - 1)
        logits = model(inputs[rows])
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets[rows].flatten(), reduction="sum"
        )
        loss = loss * loss_scale / global_tokens
        loss.backward()
        total += loss.detach()
    return total


def endless(loader: StreamingDataLoader) -> Iterator[dict[str, Any]]:
    """Batches across epoch boundaries (the loader moves to the next epoch by itself)."""
    while True:
        yield from loader


def own_process_group(worker_id: int) -> None:
    """Move a data-loader worker out of the trainer's process group.

    torchrun's SIGTERM (sent to the group) and a terminal's Ctrl-C then reach only the
    trainer, which finishes its checkpoint instead of failing on a killed worker; the
    workers still stop when the trainer does.
    """
    os.setpgrp()


@dataclass
class TrainState:
    """The loop's own counters, saved as the ``train`` part of each checkpoint."""

    step: int = 0
    rollbacks: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.rollbacks = int(state["step"]), int(state["rollbacks"])


class StopRequest:
    """SIGTERM or Ctrl-C: checkpoint after this step and exit; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


@dataclass
class Run:
    """What the loop works on, built once by ``main()``; ``parts`` is what a checkpoint holds."""

    config: dict[str, Any]
    device: torch.device
    model: Transformer
    optimizer: torch.optim.Optimizer
    loader: StreamingDataLoader
    search: MicrobatchSearch
    state: TrainState
    log: MetricsLog
    guard: SpikeGuard = field(init=False)
    faults: Faults = field(init=False)
    stop: StopRequest = field(init=False)
    watchdog: Watchdog = field(init=False)

    def __post_init__(self) -> None:
        rank = dist.get_rank()
        self.guard = SpikeGuard(**self.config["guard"])
        self.faults = Faults(self.config["inject"], rank)
        self.stop = StopRequest()
        self.watchdog = Watchdog(
            self.config["watchdog_timeout"],
            Path(self.config["run_dir"]) / f"watchdog-rank{rank}.log",
            describe=lambda: f"on rank {rank} in step {self.state.step}",
        )

    @property
    def parts(self) -> dict[str, Stateful]:
        return {
            "train": self.state,
            "loader": self.loader,
            "guard": self.guard,
            "microbatch_size": self.search,
        }

    @cached_property
    def checkpoints(self) -> CheckpointStore:
        """run_dir/checkpoints, or checkpoint.remote with uploads in the background."""
        return open_checkpoints(self.config, dist.get_rank())

    @property
    def tokens_per_step(self) -> int:
        return self.config["global_batch_size"] * self.config["model"]["seq_len"]


@dataclass
class StepResult:
    """One step's outcome, the same on every rank."""

    lr: float
    loss: float
    grad_norm: float
    action: str  # STEP, SKIP or ROLLBACK (guards.py)
    reason: str
    stop: bool  # some rank was asked to stop
    optimizer_oom: bool = False  # the optimizer step ran out of memory on some rank


def main(argv: list[str] | None = None) -> int:
    """Train as the config in ``argv`` says; returns the exit code (docs/TRAINER.md)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2

    # Config: defaults, the YAML file, overrides; every key checked before anything starts.
    config = load_config(argv[0], argv[1:])
    device, rank, world_size = init_distributed()
    per_rank_batch = setup_process(config, rank, world_size)
    if config["doctor"]:
        examine_or_exit(config, device)  # the node doctor's fast checks; exit 77 naming a rank

    # Data: the index fixes the vocabulary and must hold rows of seq_len + 1 token ids.
    loader = build_loader(config, per_rank_batch)

    # Model, sharded: built on the meta device, then initialised slice by slice per rank.
    model_config = ModelConfig(**config["model"])
    with torch.device("meta"):
        model = Transformer(model_config)
    bf16 = device.type == "cuda" if config["fsdp"]["bf16"] == "auto" else config["fsdp"]["bf16"]
    model = shard_model(
        model,
        device,
        bf16=bf16,
        seed=config["seed"],
        activation_checkpointing=config["fsdp"]["activation_checkpointing"],
        compile=config["fsdp"]["compile"],
    )
    optimizer = build_optimizer(model, config["optim"], device)

    # Checkpoint / resume: every stateful part (Run.parts) is saved and loaded by name.
    state = TrainState()
    log = MetricsLog(config["run_dir"], rank, tensorboard=config["tensorboard"])
    auto = config["microbatch_size"] == "auto"
    search = MicrobatchSearch(
        model,
        per_rank_batch,
        per_rank_batch if auto else config["microbatch_size"],
        auto,
        log=lambda kind, **fields: log.event(kind, state.step, everywhere=True, **fields),
    )
    run = Run(config, device, model, optimizer, loader, search, state, log)
    resume(run)
    if rank == 0:
        announce(config, model_config, device, world_size, bf16)

    # Training loop: step, judge, roll back or log, save on schedule or on a stop request.
    batches = endless(loader)
    while state.step < config["max_steps"]:
        state.step += 1
        started = time.perf_counter()
        batch = next(batches)
        data_wait = time.perf_counter() - started
        loader_after = loader.state_dict()
        result = train_step(run, batch)
        elapsed = time.perf_counter() - started
        if result.optimizer_oom:
            state.rollbacks += 1
            if state.rollbacks > config["guard"]["max_rollbacks"]:
                log.event("give_up", state.step, reason="out of memory in the optimizer step")
                return EXIT_TOO_MANY_ROLLBACKS
            replay(run)
            batches = endless(loader)
            continue
        if result.action == ROLLBACK:
            state.rollbacks += 1
            if state.rollbacks > config["guard"]["max_rollbacks"]:
                log.event("give_up", state.step, reason=result.reason, rollbacks=state.rollbacks)
                return EXIT_TOO_MANY_ROLLBACKS
            if rollback(run, result.reason, loader_after):
                batches = endless(loader)
            continue
        if result.action == SKIP:
            log.event("skip", state.step, reason=result.reason)
        log.step(step_record(run, result, loader_after, data_wait, elapsed))
        run.watchdog.beat()
        maybe_save(run, result.stop)
        if result.stop:
            log.event("stop", state.step, reason="signal: checkpoint saved, exiting")
            break

    batches.close()  # stops the data-loader workers now
    run.watchdog.pause()
    run.checkpoints.wait()  # the upload in flight (checkpoint.remote) is published first
    run.watchdog.stop()
    log.close()
    dist.destroy_process_group()
    return 0


def setup_process(config: dict[str, Any], rank: int, world_size: int) -> int:
    """Seed this rank, pick kernels, create run_dir; returns the per-rank batch size."""
    seed = config["seed"]
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    if config["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    global_batch, microbatch = config["global_batch_size"], config["microbatch_size"]
    if global_batch % world_size:
        raise ConfigError(
            f"global_batch_size {global_batch} is not a multiple of the world size {world_size}"
        )
    per_rank_batch = global_batch // world_size
    if microbatch != "auto" and per_rank_batch % microbatch:
        raise ConfigError(
            f"microbatch_size {microbatch} does not divide the per-rank batch {per_rank_batch} "
            f"(global_batch_size {global_batch} over {world_size} rank(s))"
        )
    if rank == 0:
        Path(config["run_dir"]).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return per_rank_batch


def build_loader(config: dict[str, Any], per_rank_batch: int) -> StreamingDataLoader:
    """The global-batch loader over ``data.local``/``data.remote``, checked against the model
    config (vocabulary, token column); a dataset that cannot be opened is a config error."""
    data = config["data"]
    try:
        dataset = StreamingDataset(
            local=data["local"],
            remote=data["remote"],
            shuffle=data["shuffle"],
            seed=config["seed"],
            batch_size=per_rank_batch,
            drop_last=True,
            cache_limit=data["cache_limit"],
        )
    except (OSError, ValueError) as error:
        where = " ".join(f"data.{k}={data[k]}" for k in ("local", "remote") if data[k])
        raise ConfigError(f"{where}: {error}") from None
    resolve_vocab_size(config, dataset)
    check_token_column(config, dataset)
    return StreamingDataLoader(
        dataset, num_workers=data["num_workers"], worker_init_fn=own_process_group
    )


def announce(
    config: dict[str, Any],
    model_config: ModelConfig,
    device: torch.device,
    world_size: int,
    bf16: bool,
) -> None:
    """Print the effective config and the model's size; save the config in run_dir (after a
    resume, so a launch that cannot resume leaves the run's config.yaml alone)."""
    print(dump(config), end="", flush=True)
    atomic_write(Path(config["run_dir"]) / "config.yaml", dump(config).encode())
    total_params, _ = count_params(model_config)
    print(
        f"model: {total_params / 1e6:.1f}M parameters, {world_size} rank(s) on "
        f"{device.type}, {'bf16' if bf16 else 'fp32'}",
        flush=True,
    )


def resume(run: Run) -> None:
    """Load every part from the latest complete checkpoint (unless autoresume is off)."""
    latest = run.checkpoints.latest() if run.config["autoresume"] else None
    if latest is None:
        return
    try:
        saved = run.checkpoints.load(latest, run.model, run.optimizer, run.parts)
    except ValueError as error:
        raise ConfigError(
            f"cannot resume: {error}; give the data and config the run was saved with, "
            "or a new run_dir, or autoresume=false"
        ) from None
    run.log.event(
        "resume",
        run.state.step,
        checkpoint=str(latest),
        world_size=dist.get_world_size(),
        saved_world_size=saved["world_size"],
        samples_seen=saved["loader"]["samples_seen"],
    )


def train_step(run: Run, batch: dict[str, Any]) -> StepResult:
    """Forward, backward and (if the guard agrees) the optimizer step on one global batch."""
    config, model, optimizer, step = run.config, run.model, run.optimizer, run.state.step
    tokens = batch[config["data"]["column"]].to(run.device, dtype=torch.long, non_blocking=True)
    lr = lr_at(step, config["optim"], config["max_steps"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_scale = run.faults.before_step(step, model, optimizer)
    loss = run.search.run(
        partial(
            forward_backward,
            model,
            tokens[:, :-1],
            tokens[:, 1:],
            global_tokens=run.tokens_per_step,
            loss_scale=loss_scale,
        ),
        zero_grad=lambda: optimizer.zero_grad(set_to_none=True),
    )
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["optim"]["grad_clip"])
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # One all-reduce gives every rank the global loss and whether any rank was asked to stop.
    stop = torch.tensor(float(run.stop.requested), device=run.device)
    shared = torch.stack([loss, stop])
    dist.all_reduce(shared)
    loss_value, stop_requested = shared[0].item(), shared[1].item() > 0
    action, reason = run.guard.judge(loss_value, grad_norm.item())
    optimizer_oom = action == STEP and run.search.optimizer_step(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        lr, loss_value, grad_norm.item(), action, reason, stop_requested, optimizer_oom
    )


def rollback(run: Run, reason: str, loader_after: dict[str, Any]) -> bool:
    """Return to the latest checkpoint and skip the data that led to the spike: from the
    checkpoint's position to the end of the bad step's batch. False: no checkpoint (a skip)."""
    checkpoint = run.checkpoints.latest()
    if checkpoint is None:
        run.log.event("skip", run.state.step, reason=f"{reason}; no checkpoint to roll back to")
        return False
    saved = run.checkpoints.load(checkpoint, run.model, run.optimizer, {"guard": run.guard})
    run.loader.load_state_dict(loader_after)
    run.log.event(
        "rollback",
        run.state.step,
        reason=reason,
        to_step=saved["train"]["step"],
        skipped_from=saved["loader"],
        skipped_to=loader_after,
        rollbacks=run.state.rollbacks,
    )
    run.state.step = saved["train"]["step"]
    run.watchdog.beat()
    return True


def replay(run: Run) -> None:
    """After an OOM in the optimizer step (which may have updated part of the parameters),
    return to the latest checkpoint, data position included, and run the same steps again."""
    step = run.state.step
    checkpoint = run.checkpoints.latest()
    if checkpoint is None:
        raise RuntimeError(
            f"out of memory in the optimizer step at step {step}, before the first checkpoint "
            "(parameters may be partly updated); a restart begins the run again"
        )
    saved = run.checkpoints.load(
        checkpoint, run.model, run.optimizer, {"guard": run.guard, "loader": run.loader}
    )
    run.log.event(
        "rollback",
        step,
        reason="out of memory in the optimizer step; replaying the same data",
        to_step=saved["train"]["step"],
        rollbacks=run.state.rollbacks,
    )
    run.state.step = saved["train"]["step"]
    run.watchdog.beat()


def maybe_save(run: Run, stop: bool) -> None:
    """Save every part every ``save_interval`` steps, at ``max_steps`` and on a stop request."""
    step, config = run.state.step, run.config
    if step % config["save_interval"] and step != config["max_steps"] and not stop:
        return
    run.watchdog.pause()
    stall = run.checkpoints.save(step, run.model, run.optimizer, run.parts)
    run.log.event("checkpoint", step, reason="stop" if stop else "interval", ckpt_stall_s=stall)
    run.watchdog.beat()


def step_record(
    run: Run,
    result: StepResult,
    loader_after: dict[str, Any],
    data_wait: float,
    elapsed: float,
) -> dict[str, Any]:
    """The metrics.jsonl line of a finished step (docs/TRAINER.md, Metrics)."""
    world_size = dist.get_world_size()
    peak = peak_flops(run.device, run.config["peak_flops"])
    model_flops = flops_per_token(run.model.cfg) * run.tokens_per_step
    return {
        "step": run.state.step,
        "loss": result.loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": run.tokens_per_step / elapsed,
        "mfu": model_flops / elapsed / (peak * world_size) if peak else None,
        "peak_mem_gb": peak_memory_gb(run.device),
        "data_wait_s": data_wait,
        "step_time_s": elapsed,
        "microbatch_size": run.search.size,
        "epoch": loader_after["epoch"],
        "samples_seen": loader_after["samples_seen"],
        "skipped": result.action == SKIP,
    }


def build_optimizer(
    model: Transformer, optim: dict[str, Any], device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=optim["lr"],
        betas=tuple(optim["betas"]),
        eps=optim["eps"],
        fused=device.type == "cuda",
    )


def resolve_vocab_size(config: dict[str, Any], dataset: StreamingDataset) -> None:
    """``model.vocab_size: auto`` becomes the tokenizer's (rounded up to 64) from provenance;
    a size set by hand must cover every token id that tokenizer gives."""
    where = config["data"]["local"] or config["data"]["remote"]
    recorded = [
        p["tokenizer"].get("vocab_size")
        for p in dataset.provenance
        if isinstance(p.get("tokenizer"), dict)
    ]
    recorded = [v for v in recorded if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    vocab = max(recorded, default=None)
    configured = config["model"]["vocab_size"]
    if configured == "auto":
        if vocab is None:
            raise ConfigError(
                f"model.vocab_size is auto but the index of {where} records no tokenizer "
                "vocab_size; set model.vocab_size"
            )
        config["model"]["vocab_size"] = 64 * math.ceil(vocab / 64)
    elif vocab is not None and configured < vocab:
        raise ConfigError(
            f"model.vocab_size {configured} is smaller than the vocab_size {vocab} of the "
            f"tokenizer recorded in the index of {where} (token ids up to {vocab - 1}); "
            f"set model.vocab_size >= {vocab} or auto"
        )


def check_token_column(config: dict[str, Any], dataset: StreamingDataset) -> None:
    """The token column must hold rows of model.seq_len + 1 integer ids."""
    column, seq_len = config["data"]["column"], config["model"]["seq_len"]
    where = config["data"]["local"] or config["data"]["remote"]
    if column not in dataset.columns:
        raise ConfigError(
            f"{where}: no column {column!r} (columns: {', '.join(dataset.columns)}); "
            "set data.column"
        )
    array = dataset.column_type(column).array
    if array is None or array[1] != (seq_len + 1,) or array[0].kind not in "iu":
        raise ConfigError(
            f"{where}: column {column!r} is {dataset.columns[column]}; model.seq_len {seq_len} "
            f"needs integer rows of {seq_len + 1} tokens (convert with --seq-len {seq_len + 1})"
        )


if __name__ == "__main__":
    try:
        code = main()
    except ConfigError as error:
        print(f"trainer: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    # Everything is saved and closed: leave without interpreter finalization, where a native
    # library thread being torn down can abort the process (SIGABRT, "terminate called
    # without an active exception"), which torchrun would take for a failure and restart.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
