"""StreamingDataLoader: a DataLoader over a StreamingDataset that saves and restores its place."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from streamshards.dataset import StreamingDataset, world
from streamshards.order import Cursor

# Samples a worker gathers into one hand-over at most: torch's queues cost about as much per
# item as reading a few hundred small samples, so items carry runs of batches, not one batch.
RUN_SAMPLES = 1024


class _Batches(IterableDataset):
    """The dataset's batches from ``cursor``, already gathered, for ``batch_size=None``.

    In-process it yields batches. A worker yields runs of consecutive batches as one item
    (``_Run``), which the loader splits again; runs grow from one batch, so the first batch
    is not delayed. The loader sets ``cursor`` before each epoch; workers get it with their
    copy of this object.
    """

    def __init__(self, dataset: StreamingDataset):
        self.dataset = dataset
        self.cursor = Cursor()

    def __len__(self) -> int:
        return self.dataset.num_batches(self.cursor)

    def __iter__(self) -> Iterator[dict[str, Any] | _Run]:
        if get_worker_info() is None:
            for batch in self.dataset.iter_batches(self.cursor):
                yield _tensors(batch)
            return
        max_run = max(1, RUN_SAMPLES // self.dataset.batch_size)
        for batch, sizes in self.dataset.iter_runs(self.cursor, max_run):
            yield _Run(_tensors(batch), sizes)


@dataclass
class _Run:
    """Consecutive batches read as one (``columns``), and the size of each."""

    columns: dict[str, Any]
    sizes: list[int]

    def pin_memory(self) -> _Run:
        """The run with its tensors in pinned memory (what ``pin_memory=True`` calls)."""
        columns = {
            k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.columns.items()
        }
        return _Run(columns, self.sizes)

    def batches(self) -> Iterator[dict[str, Any]]:
        """The batches in order: tensor slices (views) and list slices."""
        start = 0
        for size in self.sizes:
            yield {k: v[start : start + size] for k, v in self.columns.items()}
            start += size


def _tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch with its numpy arrays as tensors (shared, not copied, across processes)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The collate function of a loader whose dataset yields finished batches."""
    return batch


class StreamingDataLoader(DataLoader):
    """A DataLoader whose ``state_dict()`` is where the next global batch starts.

    Batches are gathered inside the dataset (one array per fixed-size column), so the
    loader's batch size is the dataset's ``batch_size``. Counting happens where batches
    reach the caller, so batches that workers prefetched but nobody consumed are not lost.
    The loader owns its ``cursor``; the dataset only encodes and checks it.
    """

    def __init__(self, dataset: StreamingDataset, num_workers: int = 0, **kwargs: Any):
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "StreamingDataLoader restarts its workers each epoch; "
                "persistent_workers is not supported"
            )
        for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if key in kwargs:
                raise ValueError(f"set {key} on the StreamingDataset, not on the loader")
        kwargs.setdefault("collate_fn", _as_is)  # batches are tensors and lists already
        self._batches = _Batches(dataset)
        super().__init__(self._batches, batch_size=None, num_workers=num_workers, **kwargs)
        self.streaming = dataset
        self.cursor = dataset.cursor

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self.cursor.epoch

    @property
    def samples_seen(self) -> int:
        """Samples of ``epoch`` that all ranks have consumed."""
        return self.cursor.samples_seen

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self.streaming
        dataset.rank_world = world()
        _, world_size = dataset.rank_world
        global_batch = dataset.batch_size * world_size
        end = dataset.epoch_end()
        self._batches.cursor = self.cursor
        dataset.order(self.cursor.epoch)  # built once here; forked workers inherit it
        batches = (
            batch
            for item in super().__iter__()
            for batch in (item.batches() if isinstance(item, _Run) else (item,))
        )
        for batch in batches:
            self.cursor = self.cursor.advanced(global_batch, end)
            yield batch
        self.cursor = self.cursor.next_epoch()

    def __len__(self) -> int:
        """Batches left in the current epoch on this rank."""
        return self.streaming.num_batches(self.cursor)

    def state_dict(self) -> dict[str, Any]:
        """Plain values: epoch, samples consumed by all ranks this epoch, and fingerprints."""
        return self.streaming.encode_cursor(self.cursor)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was saved (any world size, any ``num_workers``)."""
        self.cursor = self.streaming.decode_cursor(state)
