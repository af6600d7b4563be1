"""Small helpers every layer shares: atomic files, byte sizes and URL classification.

It imports nothing from the package, so any module (storage, cache, writer, trainer) can use
it without an import cycle.
"""

from __future__ import annotations

import gc
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@contextmanager
def paused_gc() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a block builds many acyclic objects (a
    decoded index): each collection it would trigger also scans everything the process already
    holds (torch's modules), which cost more than the decoding itself."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def atomic_file(target: Path) -> Iterator[BinaryIO]:
    """A new file that replaces ``target`` whole when the block ends, and vanishes on error.

    It has a hidden, unique temporary name and the umask's permissions like any new file.
    """
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "x+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so readers see the old file or the whole new one."""
    with atomic_file(target) as f:
        f.write(data)
    fsync_folder(target.parent)


def fsync_folder(folder: Path) -> None:
    """Make renames and removals in ``folder`` durable, so they survive a power loss in order."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(size: int | str | None) -> int | None:
    """Parse ``64MB``, ``1.5GiB`` or a plain byte count."""
    if size is None or isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 64MB, 1GiB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


DECIMAL_PREFIXES = ("", "K", "M", "G", "T")
BINARY_PREFIXES = ("", "Ki", "Mi", "Gi", "Ti")


def human_size(n: float, unit: str = "B", *, binary: bool = False) -> str:
    """``n`` with a prefix for people: ``812 B``, ``1.5 MB``, ``3.2 Ktok``; ``binary`` steps by
    1024 (``12.8 MiB``), as memory and disk sizes are usually read."""
    step, prefixes = (1024, BINARY_PREFIXES) if binary else (1000, DECIMAL_PREFIXES)
    for prefix in prefixes:
        if abs(n) < step or prefix == prefixes[-1]:
            return f"{n:.0f} {unit}" if not prefix else f"{n:.1f} {prefix}{unit}"
        n /= step
    return str(n)


def url_scheme(location: str | os.PathLike) -> str | None:
    """The scheme of a URL (``s3``, ``gs``, ``file``), or None for a plain local path."""
    scheme, sep, _ = os.fspath(location).partition("://")
    return scheme if sep else None


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URL of object storage: anything but a local path or a ``file://`` URL."""
    return url_scheme(location) not in (None, "file")


def local_path(location: str | os.PathLike) -> str:
    """The file-system path of a local path or a ``file://`` URL."""
    return os.fspath(location).removeprefix("file://")
