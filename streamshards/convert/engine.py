"""Where a distributed convert runs its tasks: a small engine interface and the local engine.

An engine runs named, idempotent tasks (plain functions of picklable arguments) and hands
back each result as it arrives. Every task writes its outputs under deterministic names,
atomically, so running one twice (a retry, a zombie) rewrites the same bytes. Another
engine (Dask, Spark) only has to implement ``Engine``; see ``ray_engine.RayEngine``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from streamshards.convert.errors import ConvertError

ENGINES = ("local", "ray")
MAX_RETRIES = 3


class RetryableTaskError(RuntimeError):
    """A task failed in a way worth retrying (engines retry it up to ``MAX_RETRIES`` times)."""


@dataclass(frozen=True)
class Task:
    """One unit of work: a unique name, a module-level function and its arguments."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()


@dataclass
class TaskCounts:
    """How the tasks of one job went, for the progress bar."""

    done: int = 0
    retried: int = 0
    failed: int = 0


class Engine:
    """Runs tasks; ``run`` yields (task name, result) as each task finishes, in any order."""

    counts: TaskCounts

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def check_versions(self, driver: dict[str, str]) -> None:
        """Refuse a cluster whose workers run other library versions than ``driver``."""

    def close(self) -> None:
        """Release the engine's processes or its cluster connection."""


class LocalEngine(Engine):
    """A process pool on this machine (or this process, with one worker)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.counts = TaskCounts()
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context(method))

    def _submit(self, task: Task) -> Future:
        if self.pool is not None:
            return self.pool.submit(task.fn, *task.args)
        future: Future = Future()
        try:
            future.set_result(task.fn(*task.args))
        except Exception as err:
            future.set_exception(err)
        return future

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[str, Any]]:
        attempts = {task.name: 0 for task in tasks}
        running = {self._submit(task): task for task in tasks}
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = running.pop(future)
                    try:
                        result = future.result()
                    except RetryableTaskError:
                        attempts[task.name] += 1
                        if attempts[task.name] > MAX_RETRIES:
                            self.counts.failed += 1
                            raise
                        self.counts.retried += 1
                        running[self._submit(task)] = task
                        continue
                    except BrokenProcessPool:
                        raise ConvertError(
                            f"task {task.name}: a worker process died (out of memory?); run "
                            "the same command again to resume"
                        ) from None
                    self.counts.done += 1
                    yield task.name, result
        finally:
            for future in running:
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
