"""Process group setup and FSDP2 sharding: one ``fully_shard`` per block, one at the root."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.model import Transformer


def init_distributed(timeout_seconds: float = 600.0) -> tuple[torch.device, int, int]:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU), or one of our own.

    Without torchrun the process forms a group of one, so the same code path (FSDP, DCP)
    runs in a single process. Returns (device, rank, world size).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_seconds)
        dist.init_process_group(
            backend,
            timeout=timeout,
            store=_attempt_store(timeout),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    return device, dist.get_rank(), dist.get_world_size()


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """A store private to this launch attempt when torchrun shares its agent's store.

    torchrun (torch 2.13) keeps one store across ``--max-restarts`` attempts, so a restarted
    process group would read the previous attempt's addresses and fail to connect
    ("Gloo connectFullMesh failed ... Connection refused"). Keys are prefixed by attempt,
    which each agent counts for itself: right on one node, not always on several (an agent
    restarted for a new node does not count it), so there ``python -m trainer.launch``,
    which turns the sharing off, is the way (docs/TRAINER.md, Multi-node).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nodes > 1 and os.environ.get("RANK") == "0":
        print(
            f"trainer: warning: torchrun shares one store over {nodes} nodes, so a restart "
            "can hang and a replacement node cannot join; launch with python -m "
            "trainer.launch (torchrun's arguments), docs/TRAINER.md, Multi-node",
            file=sys.stderr,
            flush=True,
        )
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"trainer/attempt{attempt}", client)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shard_model(
    model: Transformer,
    device: torch.device,
    bf16: bool,
    seed: int,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> Transformer:
    """Shard a meta-device model over all ranks, then materialise and initialise it on device.

    bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32
    (the sharded master weights and the optimizer stay fp32).
    """
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
    )
    model.activation_checkpointing = activation_checkpointing
    for block in model.blocks:
        if compile:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # Each rank divides its loss by the tokens of the whole global batch, so gradients are
    # summed over ranks, not averaged. A plain SUM (no PREMUL_SUM) also works on gloo.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    materialize(model, device, seed)
    return model


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """Allocate this rank's shards on ``device`` and fill them from full initial tensors.

    Each parameter is drawn whole from one seeded generator, in name order, and each rank
    keeps its slice: the initial weights are the same for every world size.
    """
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        full = model.initial_value(name, generator)
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)
    model.reset_buffers()
