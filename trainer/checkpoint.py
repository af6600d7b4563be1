"""Sharded checkpoints with torch.distributed.checkpoint, visible only once complete.

Layout of ``run_dir/checkpoints/``::

    step_00000200/            a complete checkpoint (renamed into place when finished)
        .metadata, *.distcp   model and optimizer shards (DCP; reshards to any world size)
        trainer.json          world size and each stateful part by name (rank 0)
        rng/rank{R}.json      each rank's torch, CUDA, numpy and Python RNG states
        COMPLETE              written last, before the rename
    .tmp-step_00000300/       being written; ignored and removed by the next save

With ``checkpoint.remote`` the checkpoints live in object storage instead
(``remote_checkpoint.py``); ``open_checkpoints`` picks the store, and both have the same
``save``/``latest``/``load``/``wait`` methods.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from streamshards.util import atomic_write, fsync_folder

COMPLETE = "COMPLETE"
_NAME = re.compile(r"step_(\d{8})")


class Stateful(Protocol):
    """A part of the training state saved in trainer.json: plain JSON values out and in."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class CheckpointStore(Protocol):
    """Where a run's checkpoints go: ``LocalCheckpoints`` or ``RemoteCheckpoints``."""

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
    ) -> float: ...

    def latest(self) -> Path | str | None: ...

    def load(
        self,
        checkpoint: Path | str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
    ) -> dict[str, Any]: ...

    def wait(self) -> float: ...


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match and (entry / COMPLETE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: dict[str, Stateful],
    keep_last: int,
) -> Path:
    """Write a checkpoint from every rank (collective); rank 0 publishes it and prunes.

    trainer.json holds the world size and ``part.state_dict()`` under each part's name.
    """
    root = Path(root)
    rank = dist.get_rank()
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    atomic_write(tmp / "rng" / f"rank{rank}.json", json.dumps(rng_state()).encode())
    dist.barrier()
    if rank == 0:
        state = {"world_size": dist.get_world_size()}
        state.update((name, part.state_dict()) for name, part in parts.items())
        atomic_write(tmp / "trainer.json", json.dumps(state, indent=1).encode())
        atomic_write(tmp / COMPLETE, b"")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_folder(root)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: dict[str, Stateful],
    where: str | None = None,
) -> dict[str, Any]:
    """Load ``parts`` from trainer.json, then model and optimizer shards (any world size) and
    this rank's RNG states if saved. Returns trainer.json's contents.

    A part that refuses its state (e.g. a loader state saved for other data) raises a
    ValueError naming the checkpoint (``where``, default ``path``) and the part, before the
    weights are read.
    """
    path = Path(path)
    where = where or str(path)
    saved = json.loads((path / "trainer.json").read_text())
    for name, part in parts.items():
        if name not in saved:
            raise ValueError(f"{where}/trainer.json has no {name!r} state")
        try:
            part.load_state_dict(saved[name])
        except ValueError as error:
            raise ValueError(f"{where}: {name} state: {error}") from None
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    rng_file = path / "rng" / f"rank{dist.get_rank()}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return saved


class LocalCheckpoints:
    """Checkpoints in ``run_dir/checkpoints``, saved synchronously (see the module docstring)."""

    def __init__(self, root: Path, keep_last: int):
        self.root = root
        self.keep_last = keep_last

    def wait(self) -> float:
        """Nothing is ever in flight; returns 0 seconds waited."""
        return 0.0

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
    ) -> float:
        """Save (collective); returns the seconds it took, all of it a stall of training."""
        started = time.perf_counter()
        save_checkpoint(self.root, step, model, optimizer, parts, self.keep_last)
        return time.perf_counter() - started

    def load(
        self,
        checkpoint: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
    ) -> dict[str, Any]:
        return load_checkpoint(checkpoint, model, optimizer, parts)


def open_checkpoints(config: dict[str, Any], rank: int) -> CheckpointStore:
    """The run's checkpoint store: ``checkpoint.remote`` if set, else ``run_dir/checkpoints``."""
    local = Path(config["run_dir"]) / "checkpoints"
    remote = config["checkpoint"]["remote"]
    if remote is None:
        return LocalCheckpoints(local, config["keep_last"])
    from trainer.faults import UploadFaults
    from trainer.remote_checkpoint import RemoteCheckpoints

    faults = UploadFaults(config["inject"], rank)
    return RemoteCheckpoints(remote, local / ".remote", config["keep_last"], faults)


def rng_state() -> dict[str, Any]:
    """This process's random generator states as JSON-ready values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
