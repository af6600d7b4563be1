"""The engine a distributed job's tasks run on, by name: ray is imported only when asked for.

Apart from ``engine`` (the interface) so that it does not import the Ray engine built on it.
"""

from __future__ import annotations

import os

from streamshards.convert.engine import ENGINES, Engine, LocalEngine
from streamshards.convert.errors import ConvertError


def open_engine(name: str, workers: int | None) -> Engine:
    """The engine called ``name``."""
    if name == "local":
        return LocalEngine(workers or os.cpu_count() or 1)
    if name == "ray":
        from streamshards.convert.ray_engine import RayEngine

        return RayEngine(workers)
    raise ConvertError(f"--engine {name!r}: expected one of {', '.join(ENGINES)}")
