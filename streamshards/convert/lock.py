"""One convert job per output folder: an flock on ``OUT/.convert.lock``, dropped by the kernel.

The lock is taken before any work or spill file is touched and held until the job (and its
upload) ends. A second job into the same OUT is refused at once; a job that died (even by
SIGKILL) holds nothing, because the kernel releases an flock with the last descriptor.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from streamshards.convert.errors import ConvertError
from streamshards.writer import OutputError, output_error, prepare_output

LOCK_NAME = ".convert.lock"

# How long a job waits for the workers of a job whose main process has died.
_DYING_GRACE_S = 10.0

# Folders this process holds, with how many nested holders each has (flock is per descriptor,
# so a second descriptor in the same process would refuse its own job).
_held: dict[str, tuple[int, int]] = {}


class OutputLock:
    """Context manager holding OUT's convert lock; raises ConvertError if another job has it."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.key = os.path.abspath(self.path)

    def __enter__(self) -> OutputLock:
        if self.key in _held:
            fd, depth = _held[self.key]
            _held[self.key] = (fd, depth + 1)
            return self
        self.created = not self.out.exists()
        try:
            prepare_output(self.out)
        except OutputError as err:
            raise ConvertError(f"OUT {err}") from None
        _held[self.key] = (self._acquire(), 1)
        return self

    def _acquire(self) -> int:
        deadline = time.monotonic() + _DYING_GRACE_S
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise ConvertError(f"OUT {output_error(self.out, err)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ConvertError(f"OUT {output_error(self.out, err)}") from None
                holder = self._holder()
                # Workers share the lock with their job; when the job's main process is gone
                # they are about to die too (see worker.py), so wait a moment for them.
                if holder is None or _alive(holder) or time.monotonic() > deadline:
                    who = f" (pid {holder})" if holder else ""
                    raise ConvertError(
                        f"{self.out} is in use by another convert job{who}; "
                        "wait for it to finish, or choose another OUT"
                    ) from None
                time.sleep(0.02)
                continue
            # The previous holder may have removed the file between our open and our flock:
            # then we locked an orphan inode, and must lock the file now at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def _holder(self) -> int | None:
        """The pid of the job's main process, as it wrote it into the lock file."""
        try:
            with open(self.path, "rb") as f:
                text = f.read(24).strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, depth = _held[self.key]
        if depth > 1:
            _held[self.key] = (fd, depth - 1)
            return
        del _held[self.key]
        # Remove the file while still holding it, so that no one can lock it in between.
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)
        if self.created:
            try:
                self.out.rmdir()  # a job that failed before writing anything leaves no folder
            except OSError:
                pass


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not yet reaped, is not running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read(512).rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")
