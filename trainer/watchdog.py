"""A step watchdog: if no heartbeat comes within the timeout, dump every stack and exit."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

EXIT_CODE = 75  # distinct from a Python error (1) so logs say which one it was


class Watchdog:
    """Exits the process with EXIT_CODE when ``beat()`` is not called for ``timeout`` seconds.

    Every thread's stack goes to stderr and to ``log_path`` first, so a hung collective or
    a stuck read can be found; a launcher such as ``torchrun --max-restarts`` then restarts
    the job and autoresume continues it. The timer starts at the first ``beat()``. This is
    also how the survivors of a dead rank leave: gloo keeps waiting in the collective.
    """

    def __init__(self, timeout: float, log_path: str | os.PathLike, describe=lambda: ""):
        self.timeout = timeout
        self.log_path = Path(log_path)
        self.describe = describe
        self._last_beat: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        if timeout > 0:
            self._thread.start()

    def beat(self) -> None:
        """Progress was made: restart the timer."""
        self._last_beat = time.monotonic()

    def pause(self) -> None:
        """Stop watching until the next ``beat()`` (for work with no fixed bound)."""
        self._last_beat = None

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout / 4)
        while not self._stop.wait(poll):
            last = self._last_beat
            if last is not None and time.monotonic() - last > self.timeout:
                self._fire(time.monotonic() - last)

    def _fire(self, waited: float) -> None:
        header = (
            f"watchdog: no progress for {waited:.0f} s (watchdog_timeout {self.timeout:g} s) "
            f"{self.describe()}; stacks of all threads follow, then exit {EXIT_CODE}\n"
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(header)
            log.flush()
            faulthandler.dump_traceback(file=log, all_threads=True)
        sys.stderr.write(header)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_CODE)
