"""The work folder of a convert job: one spill file per finished unit, written atomically.

A unit's spill file is its completion marker: it appears (by rename) only once complete, so
after a crash every spill file present is whole and every unit without one is redone.
Spill files are plain numpy arrays in an .npz, read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from streamshards.util import atomic_write

WORK_NAME = ".convert-work"
JOB_NAME = "job.json"


class WorkFolder:
    """``OUT/.convert-work``: the job description and the spill files of finished units."""

    def __init__(self, out: Path):
        self.path = out / WORK_NAME
        self.units = self.path / "units"

    def open(self, job: dict) -> set[str]:
        """Start or resume ``job`` (wiping the folder of a different one): finished unit names."""
        job_file = self.path / JOB_NAME
        if job_file.exists():
            try:
                same = json.loads(job_file.read_text(encoding="utf-8")) == job
            except (OSError, ValueError):
                same = False
            if not same:
                self.remove()
        self.units.mkdir(parents=True, exist_ok=True)
        if not job_file.exists():
            atomic_write(job_file, json.dumps(job, indent=1, sort_keys=True).encode("utf-8"))
        done = set()
        for entry in os.scandir(self.units):
            if entry.name.endswith(".npz"):
                done.add(entry.name[: -len(".npz")])
            else:
                os.unlink(entry.path)  # a temporary file left by a killed worker
        return done

    def spill_path(self, unit_name: str) -> Path:
        return self.units / f"{unit_name}.npz"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_spill(path: Path, stats: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a unit's arrays and its counts under a temporary name, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {"stats": np.frombuffer(json.dumps(stats).encode("utf-8"), dtype=np.uint8)}
    payload.update(arrays)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no partial spill file
        raise


def read_spill(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(stats, arrays) of a finished unit."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    stats = json.loads(arrays.pop("stats").tobytes().decode("utf-8"))
    return stats, arrays
