"""Bounded retries with exponential backoff and full jitter, for transient storage errors only."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("streamshards.storage")
T = TypeVar("T")


class StorageError(OSError):
    """A storage request failed; the message names the URL."""


class NotFoundError(StorageError, FileNotFoundError):
    """The bucket or object does not exist (HTTP 404): retrying cannot help."""


class PermissionDeniedError(StorageError, PermissionError):
    """The credentials may not do this (HTTP 401/403): retrying cannot help."""


class TransientError(StorageError):
    """A failure worth retrying: connection lost, timeout, 5xx, throttling, truncated body."""


@dataclass(frozen=True)
class RetryPolicy:
    """Try up to ``attempts`` times; before try n+1 sleep uniform(0, min(max_delay, base*2**n)).

    Full jitter spreads the retries of many processes so they do not hit the store in waves.
    """

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, got {self.attempts}")

    def delay(self, failures: int) -> float:
        """Seconds to sleep after ``failures`` failed tries."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (failures - 1)))

    def call(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` until it succeeds, raises a non-transient error or runs out of tries."""
        failures = 0
        while True:
            try:
                return attempt()
            except TransientError as err:
                failures += 1
                if failures >= self.attempts:
                    raise TransientError(f"{err} (gave up after {failures} tries)") from err
                pause = self.delay(failures)
                log.warning("%s; retry %d of %d in %.2fs", err, failures, self.attempts - 1, pause)
                time.sleep(pause)
