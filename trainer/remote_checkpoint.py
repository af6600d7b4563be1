"""Checkpoints in object storage (``checkpoint.remote=s3://…|gs://…``), uploaded in the background.

Layout under the remote prefix::

    step_00000200.COMPLETE     the marker: the checkpoint is complete (written last)
    step_00000200/
        .metadata, __R_I.distcp   DCP files, each uploaded by the rank that wrote it
        rng-rank{R}.json          rank R's RNG states, uploaded after its DCP files
        trainer.json              world size and the stateful parts (rank 0)

A save writes DCP synchronously to a per-rank local staging folder (the stall), then a
background thread uploads that rank's files in parallel (multipart when big). Rank 0's
thread waits until every rank's ``rng-rank{R}.json`` is up, then writes ``trainer.json``,
the marker, and prunes to ``keep_last``. Only prefixes with a marker are ever loaded, so a
checkpoint killed mid-upload is never read. One upload is in flight at a time; the next save
(or the end of the run) first has every rank agree, in a collective, that its files are up:
a rank lost meanwhile fails that collective, so rank 0 never waits for its files for ever.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import get_state_dict

from streamshards.storage import NotFoundError, Storage, open_storage
from streamshards.util import atomic_write, url_scheme
from trainer.checkpoint import (
    COMPLETE,
    Stateful,
    checkpoint_name,
    load_checkpoint,
    rng_state,
)
from trainer.config import ConfigError
from trainer.faults import UploadFaults

MARKER = re.compile(r"(step_\d{8})\." + COMPLETE)
METADATA = ".metadata"
TRANSFER_WORKERS = 8
POLL_S = 0.1


def rng_object(rank: int) -> str:
    return f"rng-rank{rank}.json"


def complete_remote(root: Storage) -> list[tuple[int, str]]:
    """(step, name) of every complete checkpoint under ``root``, oldest first.

    A missing bucket is a config error (a typo must not start the run over); a missing
    local folder (``file://``) only means no checkpoint yet.
    """
    try:
        objects = root.list()
    except NotFoundError as error:
        if url_scheme(root.url) in ("s3", "gs"):
            raise ConfigError(f"checkpoint.remote: {error}") from None
        return []
    found = [MARKER.fullmatch(o.name) for o in objects]
    return sorted((int(m.group(1)[5:]), m.group(1)) for m in found if m)


def files_read(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    """The DCP files this rank reads to load ``model`` and ``optimizer`` from the checkpoint
    whose ``.metadata`` is in ``folder``: the files DCP's load planner names for its shards,
    so at any world size a rank fetches only what it needs."""
    metadata = FileSystemReader(folder).read_metadata()
    model_state, optim_state = get_state_dict(model, optimizer)
    planner = DefaultLoadPlanner()
    planner.set_up_planner({"model": model_state, "optim": optim_state}, metadata, False)
    plan = planner.create_local_plan()
    return {metadata.storage_data[item.storage_index].relative_path for item in plan.items}


class RemoteCheckpoints:
    """Save to, find in and load from ``url``; the same methods as ``LocalCheckpoints``."""

    def __init__(self, url: str, staging: Path, keep_last: int, faults: UploadFaults):
        self.url = url.rstrip("/")
        self.root = open_storage(self.url)
        self.staging = staging
        self.keep_last = keep_last
        self.faults = faults
        self.rank = dist.get_rank()
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None
        self._uploaded = threading.Event()  # this rank's own files are up, or failed
        self._abandon = threading.Event()  # another rank's upload failed: no marker

    def folder(self, name: str) -> Storage:
        return open_storage(f"{self.url}/{name}")

    def wait(self) -> float:
        """Finish the upload in flight (collective), raising any rank's upload error; returns
        the seconds waited.

        Once this rank's own files are up, the ranks exchange their upload errors: a rank lost
        since the save fails this collective here (gloo: its connections reset) instead of
        leaving rank 0's thread waiting for that rank's files, which would hang the run.
        """
        started = time.perf_counter()
        if self._upload is None:
            return time.perf_counter() - started
        self._uploaded.wait()
        own = None if self._error is None else f"{type(self._error).__name__}: {self._error}"
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, own)
        failed = [f"rank {rank}: {error}" for rank, error in enumerate(errors) if error]
        if failed:
            self._abandon.set()
        self._upload.join()
        self._upload = None
        error, self._error = self._error, None
        if failed or error is not None:
            reasons = "; ".join(failed) or f"rank {self.rank}: {error}"
            raise RuntimeError(f"checkpoint upload to {self.url} failed: {reasons}") from error
        return time.perf_counter() - started

    def latest(self) -> str | None:
        """The URL of the newest complete checkpoint; collective: the upload in flight is
        published first, so every rank sees the same answer."""
        self.wait()
        dist.barrier()
        found = complete_remote(self.root)
        return f"{self.url}/{found[-1][1]}" if found else None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
    ) -> float:
        """Write this rank's DCP files locally and start their upload (collective); returns
        the seconds training stalled, including the wait for the previous upload."""
        started = time.perf_counter()
        self.wait()
        name = checkpoint_name(step)
        if self.rank == 0:
            # A launch killed while uploading this step left objects (and rank markers).
            folder = self.folder(name)
            try:
                leftovers = [o.name for o in folder.list()] + [METADATA]
            except NotFoundError:
                leftovers = []
            for leftover in leftovers:
                folder.delete(leftover)
        own = self.staging / f"rank{self.rank}"
        shutil.rmtree(own, ignore_errors=True)  # also what a killed launch left
        local = own / f"upload-{name}"
        local.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        # Replicated values (AdamW's step counters) go to rank 0's file, not spread over all
        # files, so that a resuming rank needs its own file and rank 0's, not every file.
        planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=local, planner=planner)
        atomic_write(local / "rng.json", json.dumps(rng_state()).encode())
        trainer_json = None
        if self.rank == 0:
            state = {"world_size": dist.get_world_size()}
            state.update((part, value.state_dict()) for part, value in parts.items())
            trainer_json = json.dumps(state, indent=1).encode()
        world_size = dist.get_world_size()
        self._uploaded.clear()
        self._abandon.clear()
        self._upload = threading.Thread(
            target=self._run_upload,
            args=(step, local, world_size, trainer_json),
            name=f"checkpoint-upload-{name}",
            daemon=True,
        )
        self._upload.start()
        return time.perf_counter() - started

    def _run_upload(
        self, step: int, local: Path, world_size: int, trainer_json: bytes | None
    ) -> None:
        try:
            self._publish(step, local, world_size, trainer_json)
        except BaseException as error:  # re-raised in the main thread by wait()
            self._error = error
        finally:
            self._uploaded.set()

    def _publish(self, step: int, local: Path, world_size: int, trainer_json: bytes | None) -> None:
        """Upload this rank's files, its RNG object last; rank 0 then completes the checkpoint."""
        name = checkpoint_name(step)
        folder = self.folder(name)
        self.faults.before_upload(step)
        files = sorted(p for p in local.iterdir() if p.name != "rng.json")
        with ThreadPoolExecutor(TRANSFER_WORKERS) as pool:
            list(pool.map(lambda path: folder.put(path, path.name), files))
        self.faults.after_files(step)
        folder.put(local / "rng.json", rng_object(self.rank))
        shutil.rmtree(local, ignore_errors=True)
        self._uploaded.set()
        if trainer_json is None:
            return
        expected = {rng_object(rank) for rank in range(world_size)}
        while not expected <= {o.name for o in folder.list()}:
            if self._abandon.wait(POLL_S):
                return  # a rank's files will not come: the checkpoint stays incomplete
        folder.put_bytes(trainer_json, "trainer.json")
        self.root.put_bytes(b"", f"{name}.{COMPLETE}")
        for _, old in complete_remote(self.root)[: -self.keep_last]:
            self._remove(old)

    def _remove(self, name: str) -> None:
        """Delete a checkpoint: its marker first, so it is never seen half deleted."""
        self.root.delete(f"{name}.{COMPLETE}")
        folder = self.folder(name)
        names = [o.name for o in folder.list()] + [METADATA]
        with ThreadPoolExecutor(TRANSFER_WORKERS) as pool:
            list(pool.map(folder.delete, names))

    def load(
        self,
        url: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
    ) -> dict[str, Any]:
        """Download what this rank needs of the checkpoint at ``url`` (trainer.json, .metadata,
        its RNG states, the DCP files its shards read; in parallel) and load it (collective)."""
        folder = open_storage(url)
        local = self.staging / f"rank{self.rank}" / f"download-{url.rsplit('/', 1)[-1]}"
        shutil.rmtree(local, ignore_errors=True)
        (local / "rng").mkdir(parents=True)
        folder.get("trainer.json", local / "trainer.json")
        folder.get(METADATA, local / METADATA)
        try:
            folder.get(rng_object(self.rank), local / "rng" / f"rank{self.rank}.json")
        except NotFoundError:
            pass  # saved on fewer ranks: this rank keeps its own seed
        needed = sorted(files_read(local, model, optimizer))
        with ThreadPoolExecutor(TRANSFER_WORKERS) as pool:
            list(pool.map(lambda file: folder.get(file, local / file), needed))
        saved = load_checkpoint(local, model, optimizer, parts, where=folder.url)
        shutil.rmtree(local, ignore_errors=True)
        return saved
