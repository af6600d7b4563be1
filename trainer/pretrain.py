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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from streamshards import StreamingDataLoader, StreamingDataset
from streamshards.index import atomic_write
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import ConfigError, dump, load_config
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2

    # Config ---------------------------------------------------------------------------------
    config = load_config(argv[0], argv[1:])
    run_dir = Path(config["run_dir"])
    seed = config["seed"]

    # Distributed setup ----------------------------------------------------------------------
    device, rank, world_size = init_distributed()
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    if config["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if config["global_batch_size"] % world_size:
        raise ConfigError(
            f"global_batch_size {config['global_batch_size']} is not a multiple of the "
            f"world size {world_size}"
        )
    per_rank_batch = config["global_batch_size"] // world_size
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    # Data -----------------------------------------------------------------------------------
    data = config["data"]
    dataset = StreamingDataset(
        local=data["local"],
        remote=data["remote"],
        shuffle=data["shuffle"],
        seed=seed,
        batch_size=per_rank_batch,
        drop_last=True,
        cache_limit=data["cache_limit"],
    )
    loader = StreamingDataLoader(
        dataset, num_workers=data["num_workers"], worker_init_fn=own_process_group
    )
    resolve_vocab_size(config, dataset)
    check_token_column(config, dataset)

    # Model, sharded -------------------------------------------------------------------------
    model_config = ModelConfig(**config["model"])
    with torch.device("meta"):
        model = Transformer(model_config)
    bf16 = device.type == "cuda" if config["fsdp"]["bf16"] == "auto" else config["fsdp"]["bf16"]
    model = shard_model(
        model,
        device,
        bf16=bf16,
        seed=seed,
        activation_checkpointing=config["fsdp"]["activation_checkpointing"],
        compile=config["fsdp"]["compile"],
    )
    optimizer = build_optimizer(model, config["optim"], device)
    if rank == 0:
        print(dump(config), end="", flush=True)
        atomic_write(run_dir / "config.yaml", dump(config).encode())
        total_params, _ = count_params(model_config)
        print(
            f"model: {total_params / 1e6:.1f}M parameters, {world_size} rank(s) on "
            f"{device.type}, {'bf16' if bf16 else 'fp32'}",
            flush=True,
        )
    log = MetricsLog(run_dir, rank)

    # Checkpoint / resume --------------------------------------------------------------------
    checkpoints = run_dir / "checkpoints"
    guard = SpikeGuard(**config["guard"])
    auto_microbatch = config["microbatch_size"] == "auto"
    microbatch_size = per_rank_batch if auto_microbatch else config["microbatch_size"]
    step, rollbacks = 0, 0
    latest = latest_checkpoint(checkpoints) if config["autoresume"] else None
    if latest is not None:
        saved = load_checkpoint(latest, model, optimizer)
        step, rollbacks = saved["step"], saved["rollbacks"]
        loader.load_state_dict(saved["loader"])
        guard.load_state_dict(saved["guard"])
        if auto_microbatch:
            microbatch_size = fit_microbatch(saved["microbatch_size"], per_rank_batch)
        log.event(
            "resume",
            step,
            checkpoint=str(latest),
            world_size=world_size,
            saved_world_size=saved["world_size"],
            samples_seen=saved["loader"]["samples_seen"],
        )

    def trainer_state() -> dict[str, Any]:
        return {
            "loader": loader.state_dict(),
            "microbatch_size": search.size,
            "guard": guard.state_dict(),
            "rollbacks": rollbacks,
            "lr": lr_at(step, config["optim"], config["max_steps"]),
        }

    # Training loop --------------------------------------------------------------------------
    search = MicrobatchSearch(
        model,
        per_rank_batch,
        microbatch_size,
        auto_microbatch,
        log=lambda kind, **fields: log.event(kind, step, everywhere=True, **fields),
    )
    faults = Faults(config["inject"], rank)
    stop_requested: list[int] = []

    def request_stop(signum: int, frame: Any) -> None:
        """SIGTERM or Ctrl-C: checkpoint after this step and exit; a second Ctrl-C aborts."""
        if stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_requested.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    watchdog = Watchdog(
        config["watchdog_timeout"],
        run_dir / f"watchdog-rank{rank}.log",
        describe=lambda: f"on rank {rank} in step {step}",
    )
    seq_len = model_config.seq_len
    tokens_per_step = config["global_batch_size"] * seq_len
    model_flops = flops_per_token(model_config) * tokens_per_step
    peak = peak_flops(device, config["peak_flops"])
    batches = endless(loader)
    while step < config["max_steps"]:
        step += 1
        started = time.perf_counter()
        batch = next(batches)
        data_wait = time.perf_counter() - started
        loader_after = loader.state_dict()
        tokens = batch[data["column"]].to(device, dtype=torch.long, non_blocking=True)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        lr = lr_at(step, config["optim"], config["max_steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_scale = faults.before_step(step, model)

        loss = search.run(
            partial(
                forward_backward,
                model,
                inputs,
                targets,
                global_tokens=tokens_per_step,
                loss_scale=loss_scale,
            ),
            zero_grad=lambda: optimizer.zero_grad(set_to_none=True),
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["optim"]["grad_clip"])
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # One all-reduce gives every rank the global loss and whether any rank was asked to stop.
        shared = torch.stack([loss, torch.tensor(float(bool(stop_requested)), device=device)])
        dist.all_reduce(shared)
        loss_value, stop = shared[0].item(), shared[1].item() > 0
        action, reason = guard.judge(loss_value, grad_norm.item())
        if action == STEP:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started

        if action == SKIP:
            log.event("skip", step, reason=reason)
        if action == ROLLBACK:
            rollbacks += 1
            checkpoint = latest_checkpoint(checkpoints)
            if rollbacks > config["guard"]["max_rollbacks"]:
                log.event("give_up", step, reason=reason, rollbacks=rollbacks)
                return EXIT_TOO_MANY_ROLLBACKS
            if checkpoint is None:
                log.event("skip", step, reason=f"{reason}; no checkpoint to roll back to")
                continue
            saved = load_checkpoint(checkpoint, model, optimizer)
            guard.load_state_dict(saved["guard"])
            # Skip the data window that led to the spike: from the checkpoint's position
            # to the end of the bad step's batch.
            loader.load_state_dict(loader_after)
            batches = endless(loader)
            log.event(
                "rollback",
                step,
                reason=reason,
                to_step=saved["step"],
                skipped_from=saved["loader"],
                skipped_to=loader_after,
                rollbacks=rollbacks,
            )
            step = saved["step"]
            watchdog.beat()
            continue

        log.step(
            {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens_per_step / elapsed,
                "mfu": model_flops / elapsed / (peak * world_size) if peak else None,
                "peak_mem_gb": peak_memory_gb(device),
                "data_wait_s": data_wait,
                "step_time_s": elapsed,
                "microbatch_size": search.size,
                "epoch": loader_after["epoch"],
                "samples_seen": loader_after["samples_seen"],
                "skipped": action == SKIP,
            }
        )
        watchdog.beat()
        if step % config["save_interval"] == 0 or step == config["max_steps"] or stop:
            watchdog.pause()
            save_checkpoint(
                checkpoints, step, model, optimizer, trainer_state(), config["keep_last"]
            )
            log.event("checkpoint", step, reason="stop" if stop else "interval")
            watchdog.beat()
        if stop:
            log.event("stop", step, reason="signal: checkpoint saved, exiting")
            break

    batches.close()  # stops the data-loader workers now
    watchdog.stop()
    log.close()
    dist.destroy_process_group()
    return 0


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


def fit_microbatch(saved: int, per_rank_batch: int) -> int:
    """The saved microbatch size, lowered to a divisor of this world size's per-rank batch."""
    size = min(saved, per_rank_batch)
    while per_rank_batch % size:
        size -= 1
    return size


def resolve_vocab_size(config: dict[str, Any], dataset: StreamingDataset) -> None:
    """``model.vocab_size: auto`` becomes the tokenizer's (rounded up to 64) from provenance."""
    if config["model"]["vocab_size"] != "auto":
        return
    tokenizer = dataset.sources[0].index.provenance.get("tokenizer") or {}
    vocab = tokenizer.get("vocab_size")
    if not vocab:
        where = config["data"]["local"] or config["data"]["remote"]
        raise ConfigError(
            f"model.vocab_size is auto but the index of {where} records no tokenizer "
            "vocab_size; set model.vocab_size"
        )
    config["model"]["vocab_size"] = 64 * math.ceil(vocab / 64)


def check_token_column(config: dict[str, Any], dataset: StreamingDataset) -> None:
    """The token column must hold rows of model.seq_len + 1 integer ids."""
    column, seq_len = config["data"]["column"], config["model"]["seq_len"]
    where = config["data"]["local"] or config["data"]["remote"]
    if column not in dataset.columns:
        raise ConfigError(
            f"{where}: no column {column!r} (columns: {', '.join(dataset.columns)}); "
            "set data.column"
        )
    array = dataset.column_types[list(dataset.columns).index(column)].array
    if array is None or array[1] != (seq_len + 1,) or array[0].kind not in "iu":
        raise ConfigError(
            f"{where}: column {column!r} is {dataset.columns[column]}; model.seq_len {seq_len} "
            f"needs integer rows of {seq_len + 1} tokens (convert with --seq-len {seq_len + 1})"
        )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"trainer: {error}", file=sys.stderr)
        sys.exit(2)
