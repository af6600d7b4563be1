"""Does a file hold exactly the shard its index entry describes? One check, one error format.

``check_shard`` compares size, then xxh3-64, and raises a ShardError naming the shard, the
file and both sizes and hashes. A file the node cache has checked carries a stamp (the
extended attribute ``user.streamshards.verified`` holding size, mtime and hash), so that
``is_verified`` can trust it again without hashing it in every process. Any write to the
file changes its mtime and so voids the stamp; on a file system without user extended
attributes nothing is stamped and every check hashes.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import time
from typing import BinaryIO

from streamshards.format import ShardError, stored_hash
from streamshards.index import ShardInfo

STAMP_ATTR = "user.streamshards.verified"
# How long a file must have been left unchanged before it is stamped (see mark_verified).
SETTLE_NS = 2_000_000_000


def file_hash(f: BinaryIO) -> str:
    """xxh3-64 of an open file's whole content, memory-mapped."""
    f.flush()
    if os.fstat(f.fileno()).st_size == 0:
        return stored_hash(b"")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return stored_hash(data)


def check_shard(
    file: str | os.PathLike | BinaryIO, info: ShardInfo, where: str | None = None
) -> None:
    """Raise ShardError unless ``file`` (a path or an open binary file) is the shard ``info``.

    The size is checked first; a file longer than the index says is never read. ``where``
    names the file in the message (a URL, say); by default its path.
    """
    if isinstance(file, (str, os.PathLike)):
        where = where or os.fspath(file)
        try:
            # O_NONBLOCK: a FIFO in a shard's place must not block the open.
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as err:
            reason = "is missing" if err.errno == errno.ENOENT else f"cannot be read ({err})"
            raise ShardError(f"shard {info.file}: file {where} {reason}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ShardError(f"shard {info.file}: {where} is not a regular file")
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            _check_open(f, info, where)
    else:
        _check_open(file, info, where or getattr(file, "name", "file"))


def _check_open(f: BinaryIO, info: ShardInfo, where: str) -> None:
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise ShardError(f"shard {info.file}: {where} is not a regular file")
    if ":" in info.hash:  # an MDS or LitData shard: the hash its own index records
        from streamshards.interop.common import check_file

        return check_file(f, info, where)
    size = st.st_size
    problem = mismatch(info, where, size, file_hash(f) if size <= info.stored_bytes else None)
    if problem:
        raise ShardError(f"shard {info.file}: {problem}")


def mismatch(info: ShardInfo, where: str, size: int, actual_hash: str | None) -> str | None:
    """Why a file or object of ``size`` bytes hashing to ``actual_hash`` (None: not hashed)
    is not the shard ``info``, or None if it is."""
    if size == info.stored_bytes and actual_hash == info.hash:
        return None
    actual = f"xxh3_64={actual_hash}" if actual_hash else "not hashed, longer than the index says"
    return (
        f"{where} does not match the index: index says {info.stored_bytes} bytes with "
        f"xxh3_64={info.hash}, file has {size} bytes ({actual})"
    )


def _stamp(st: os.stat_result, info: ShardInfo) -> bytes:
    return f"{st.st_size} {st.st_mtime_ns} {info.hash}".encode()


def mark_verified(
    path: str | os.PathLike | int, info: ShardInfo, checked: os.stat_result | None = None
) -> None:
    """Record that ``path`` (or an open descriptor) matched ``info`` when its stat was
    ``checked`` (taken before the check, so a write during it voids the stamp); a no-op where
    the file system has no user extended attributes. A file changed in the last
    ``SETTLE_NS`` is not stamped: file times tick coarsely, so a write in the same tick as the
    check could leave the stamped mtime in place."""
    checked = checked or os.stat(path)
    if time.time_ns() - checked.st_mtime_ns < SETTLE_NS:
        return
    try:
        os.setxattr(path, STAMP_ATTR, _stamp(checked, info))
    except OSError as err:
        if err.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EROFS):
            raise


def settle(fd: int) -> os.stat_result:
    """Set the mtime of a file this process has just written and checked ``SETTLE_NS`` into
    the past, so that it can be stamped at once; any later write moves it to the present.
    Only for files the caller owns (the node cache's downloads)."""
    st = os.fstat(fd)
    os.utime(fd, ns=(st.st_atime_ns, time.time_ns() - 2 * SETTLE_NS))
    return os.fstat(fd)


def is_verified(path: str | os.PathLike | int, info: ShardInfo) -> bool:
    """Whether ``path`` (or an open descriptor) carries a stamp for ``info`` that its current
    size and mtime still match.

    Costs one stat and one getxattr, never a read of the file.
    """
    try:
        st = os.stat(path)
        return stat.S_ISREG(st.st_mode) and os.getxattr(path, STAMP_ATTR) == _stamp(st, info)
    except OSError:
        return False


def verify_and_mark(path: str | os.PathLike, info: ShardInfo) -> None:
    """``check_shard`` unless already stamped, then stamp: each cached file is hashed once."""
    if not is_verified(path, info):
        try:
            before = os.stat(path)
        except OSError:
            before = None  # check_shard names the problem
        check_shard(path, info)
        mark_verified(path, info, before)
