"""The Ray engine: convert tasks as Ray Core tasks on a cluster (``streamshards[ray]``).

Connects to ``RAY_ADDRESS`` when set, else starts a local Ray. Tasks are spread over the
nodes; a task whose worker or node dies is retried by Ray (``max_retries``), and a task that
raises ``RetryableTaskError`` is retried too. Outputs have deterministic names and appear
atomically, so a retry or a zombie attempt rewrites the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from streamshards.convert.engine import MAX_RETRIES, Engine, RetryableTaskError, Task, TaskCounts
from streamshards.convert.errors import ConvertError

PROBE_TIMEOUT_S = 120


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConvertError("--engine ray needs Ray: pip install 'streamshards[ray]'") from None
    return ray


def library_versions() -> dict[str, str]:
    """The versions that decide output bytes: streamshards, tokenizers, zstandard."""
    from importlib.metadata import PackageNotFoundError, version

    from streamshards._version import __version__

    found = {"streamshards": __version__}
    for name in ("tokenizers", "zstandard"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def version_mismatches(driver: dict[str, str], nodes: dict[str, dict[str, str]]) -> list[str]:
    """One line per node and library whose version differs from the driver's."""
    lines = []
    for node, versions in sorted(nodes.items()):
        for name, wanted in driver.items():
            got = versions.get(name, "missing")
            if got != wanted:
                lines.append(f"node {node}: {name} {got} (driver: {wanted})")
    return lines


class RayEngine(Engine):
    """Runs tasks on the Ray cluster at ``RAY_ADDRESS`` (or a local one it starts)."""

    def __init__(self, workers: int | None):
        ray = self.ray = _import_ray()
        self.counts = TaskCounts()
        self.started = not ray.is_initialized()
        if self.started:
            address = os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
            if not address:
                kwargs.update(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False)
            try:
                ray.init(address=address or None, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConvertError(
                    f"cannot connect to the Ray cluster at {address}: {err}"
                ) from None

    def check_versions(self, driver: dict[str, str]) -> None:
        """Ask one task on every alive node for its versions; refuse any difference."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(library_versions)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {
            n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote()
            for n in nodes
        }
        found = {}
        for node, ref in refs.items():
            try:
                found[node] = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise ConvertError(
                    f"Ray node {node} did not report its library versions within "
                    f"{PROBE_TIMEOUT_S} s; is it alive?"
                ) from None
        problems = version_mismatches(driver, found)
        if problems:
            raise ConvertError(
                "the Ray cluster runs other library versions than this driver, so its output "
                "would differ from a local run: " + "; ".join(problems)
            )

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[str, Any]]:
        ray = self.ray
        remote = {}
        refs = {}
        for task in tasks:
            fn = remote.get(task.fn)
            if fn is None:
                fn = remote[task.fn] = ray.remote(task.fn).options(
                    max_retries=MAX_RETRIES,
                    retry_exceptions=[RetryableTaskError],
                    scheduling_strategy="SPREAD",
                )
            refs[fn.remote(*task.args)] = task.name
        pending = list(refs)
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                for ref in finished:
                    name = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        self.counts.failed += 1
                        cause = err.cause if isinstance(err.cause, Exception) else err
                        raise ConvertError(f"task {name} failed: {cause}") from None
                    except ray.exceptions.RayError as err:
                        self.counts.failed += 1
                        raise ConvertError(
                            f"task {name} failed after {MAX_RETRIES} retries: {err}; run the "
                            "same command again to resume"
                        ) from None
                    self.counts.done += 1
                    yield name, result
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()
