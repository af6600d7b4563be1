"""Work done per unit, in a worker process: documents -> encoded columns or tokens -> spill file.

Each worker process builds one ``UnitProcessor`` (tokenizer and filter loaded once) and then
handles units in any order; a unit's result depends on that unit alone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamshards.columns import encode, parse_column_type
from streamshards.convert.documents import DocumentReader, DocumentRules
from streamshards.convert.spill import write_spill
from streamshards.convert.tokenize import Encoder, TokenizerInfo

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs, as plain values that travel to another process."""

    rules: DocumentRules
    tokenizer: TokenizerInfo | None
    parent_pid: int = 0


class UnitProcessor:
    """Turns one unit's payload into a spill file and returns the unit's counts."""

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.reader = DocumentReader(setup.rules)
        self.encoder = Encoder(setup.tokenizer) if setup.tokenizer else None
        self.text_type = parse_column_type("str")
        self.keep_types = [
            (name, parse_column_type(t, name)) for name, t in setup.rules.keep_fields
        ]

    def process(self, kind: str, payload, path: str, first_line: int, spill: Path) -> dict:
        docs = self.reader.read(kind, payload, path, first_line)
        if isinstance(payload, bytes):
            bytes_read = len(payload)
        else:
            bytes_read = sum(len(t.encode("utf-8")) for t in docs.texts)
        arrays: dict[str, np.ndarray] = {}
        if docs.hashes:
            arrays["hashes"] = np.frombuffer(b"".join(docs.hashes), dtype=np.uint8)
        tokens = 0
        if self.encoder is not None:
            arrays["lengths"], arrays["tokens"] = self.encoder.encode(docs.texts)
            tokens = int(arrays["lengths"].sum())
        else:
            columns = [[encode(t, self.text_type, "text") for t in docs.texts]]
            for k, (name, ctype) in enumerate(self.keep_types):
                columns.append([encode(extra[k], ctype, name) for extra in docs.extras])
            for k, values in enumerate(columns):
                offsets = np.zeros(len(values) + 1, dtype=np.int64)
                np.cumsum([len(v) for v in values], out=offsets[1:])
                arrays[f"offsets{k}"] = offsets
                arrays[f"data{k}"] = np.frombuffer(b"".join(values), dtype=np.uint8)
        stats = {
            "read": docs.read,
            "kept": len(docs.texts),
            "dropped": dict(docs.dropped),
            "errors": dict(docs.errors),
            "bytes_read": bytes_read,
            "tokens": tokens,
        }
        write_spill(spill, stats, arrays)
        return stats


_processor: UnitProcessor | None = None


def init_worker(setup: WorkerSetup) -> None:
    """Process-pool initializer: tie this process's life to the job's, then build its processor."""
    global _processor
    if setup.parent_pid and setup.parent_pid != os.getpid():
        die_with_parent(setup.parent_pid)
        # One worker process is one core: the tokenizer's thread pool would only fight the
        # other workers. Set here, in the pool's own process, never in the caller's.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _processor = UnitProcessor(setup)


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` dies, even by SIGKILL, so no worker is orphaned.

    On Linux the kernel sends SIGKILL at the parent's death (PR_SET_PDEATHSIG); elsewhere a
    daemon thread watches the parent pid. Either way a parent that died first is caught here.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def release_worker() -> None:
    """Forget this process's UnitProcessor (the one-worker case runs in the main process)."""
    global _processor
    _processor = None


def process_unit(kind: str, payload, path: str, first_line: int, spill: Path) -> dict:
    """Process-pool task: one unit through this process's UnitProcessor."""
    return _processor.process(kind, payload, path, first_line, spill)
