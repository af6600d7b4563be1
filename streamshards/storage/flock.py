"""Fork-safe ``flock`` helpers: the locks that coordinate processes sharing a cache folder.

flock locks belong to the open file, and a forked child shares its parent's open files: a
child that kept them would hold the parent's locks for as long as it lives. So every lock
descriptor is registered here, and a forked child closes its copies at once, without
unlocking (the parent still holds them). The kernel drops a dead process's locks.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_lock_fds: set[int] = set()
_lock_fds_mutex = threading.Lock()


def open_lock(path: Path) -> int:
    """Open (creating if needed) a lock file; the descriptor is closed in forked children.

    A lock folder deleted meanwhile (a cache wiped under running readers) is made again.
    """
    with _lock_fds_mutex:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        _lock_fds.add(fd)
    return fd


def is_current(fd: int | None, path: Path) -> bool:
    """Whether ``fd`` is still the lock file at ``path``: false once the file was deleted
    (and perhaps made again), when its lock no longer excludes processes that open ``path``."""
    try:
        return fd is not None and os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def close_lock(fd: int) -> None:
    """Close a descriptor from ``open_lock``, which releases the locks it held."""
    with _lock_fds_mutex:
        _lock_fds.discard(fd)
        os.close(fd)


def _close_inherited_locks() -> None:
    for fd in _lock_fds:
        os.close(fd)
    _lock_fds.clear()
    _lock_fds_mutex.release()


os.register_at_fork(
    before=_lock_fds_mutex.acquire,
    after_in_parent=_lock_fds_mutex.release,
    after_in_child=_close_inherited_locks,
)


@contextmanager
def flocked(path: Path, mode: int) -> Iterator[int | None]:
    """Hold ``flock(mode)`` on ``path`` for the block; yields None if LOCK_NB found it taken."""
    fd = open_lock(path)
    try:
        try:
            fcntl.flock(fd, mode)
            acquired = True
        except BlockingIOError:
            acquired = False
        yield fd if acquired else None
    finally:
        close_lock(fd)
