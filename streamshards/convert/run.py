"""The convert job: inputs cut into units, units processed in parallel, packed in order, resumable.

Design (docs/CONVERT.md): the main process reads every input in order and cuts it into units
of whole records; workers turn units into spill files in ``OUT/.convert-work`` (each file
appears atomically when its unit is done); the main process feeds finished units, strictly
in input order, to one ShardWriter. Shard bytes therefore depend only on the inputs and the
options, never on the number of workers or on timing, and a killed job re-run with the same
arguments reuses every finished unit and rewrites the same shards. The index comes last.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import xxhash

from streamshards._version import __version__
from streamshards.convert.documents import DocumentRules, load_filter
from streamshards.convert.engine import ENGINES
from streamshards.convert.errors import ConvertError
from streamshards.convert.inputs import FileReport, InputFile, find_inputs, read_units
from streamshards.convert.lock import LOCK_NAME, OutputLock
from streamshards.convert.options import (
    ConvertOptions,
    ConvertResult,
    Progress,
    parse_keep_fields,
)
from streamshards.convert.pack import Deduper, RawPacker, TokenPacker
from streamshards.convert.spill import WorkFolder, read_spill
from streamshards.convert.tokenize import TokenizerInfo, describe_tokenizer
from streamshards.convert.worker import WorkerSetup, init_worker, process_unit, release_worker
from streamshards.index import INDEX_NAME, IndexFormatError, load_index
from streamshards.util import parse_size
from streamshards.writer import (
    OutputError,
    ShardWriter,
    output_error,
    parse_compression,
)

UNREADABLE_FILE = "unreadable_file"
DEDUP_RULE = "exact: xxh3-128 of the text lowercased, whitespace runs collapsed; first kept"
SHARD_FILE = re.compile(r"^\.?shard\.\d{6}\.ssd(\.zst)?(\.tmp)?$")


class ConvertJob:
    """One run of convert; ``run()`` does the whole job (or resumes it) and returns a result."""

    def __init__(self, options: ConvertOptions, progress: Callable[[Progress], None] | None = None):
        self.options = options
        self.report_progress = progress or (lambda p: None)
        self.out = Path(options.out)
        self._check_options()
        self.inputs: list[InputFile] = self._find_inputs()
        self.unit_bytes = parse_size(options.unit_size)
        self.keep_fields = parse_keep_fields(options.keep_fields, options.text_field)
        if options.user_filter:
            load_filter(options.user_filter)  # fail here, not in every worker
        self.tokenizer: TokenizerInfo | None = None
        if options.tokenizer:
            self.tokenizer = describe_tokenizer(options.tokenizer, options.eos_id, options.bos_id)
        self.rules = DocumentRules(
            text_field=options.text_field,
            keep_fields=self.keep_fields,
            txt_per_line=options.txt_per_line,
            on_error=options.on_error,
            min_chars=options.min_chars,
            max_chars=options.max_chars,
            user_filter=options.user_filter,
            dedup=options.dedup,
        )
        self.job = self._describe_job()
        self.job_id = xxhash.xxh3_64_hexdigest(repr(sorted(self.job.items())).encode("utf-8"))
        self.work = WorkFolder(self.out)
        self.result = ConvertResult(str(self.out))

    def _check_options(self) -> None:
        o = self.options
        if o.on_error not in ("fail", "skip"):
            raise ConvertError(f"--on-error {o.on_error!r}: expected fail or skip")
        if o.tail not in ("drop", "pad"):
            raise ConvertError(f"--tail {o.tail!r}: expected drop or pad")
        if o.engine not in ENGINES:
            raise ConvertError(f"--engine {o.engine!r}: expected one of {', '.join(ENGINES)}")
        if o.workers is not None and o.workers < 1:
            raise ConvertError(f"--workers {o.workers}: need at least 1")
        if o.seq_len < 1:
            raise ConvertError(f"--seq-len {o.seq_len}: need at least 1")
        if o.tokenizer and o.keep_fields:
            raise ConvertError(
                "--keep-fields applies to raw mode only: packed sequences span documents"
            )
        try:
            parse_compression(o.compression)
            if not parse_size(o.unit_size) or not parse_size(o.size_limit):
                raise ValueError("sizes must be positive")
        except ValueError as err:
            raise ConvertError(str(err)) from None

    def _describe_job(self) -> dict:
        """Everything that decides the output bytes; a work folder is reused only for the same."""
        options = asdict(self.options)
        for name in ("inputs", "out", "workers", "overwrite", "tokenizer", "engine"):
            options.pop(name)
        options["keep_fields"] = list(self.keep_fields)
        options["unit_bytes"] = self.unit_bytes
        return {
            "tool": __version__,
            "inputs": self._input_stamps(),
            "tokenizer": self.tokenizer.xxh3_64 if self.tokenizer else None,
            "options": options,
        }

    def _find_inputs(self) -> list[InputFile]:
        return find_inputs(self.options.inputs)

    def _input_stamps(self) -> list[list]:
        """What identifies each input's content for resuming: path, size, modification time."""
        stats = [os.stat(f.path) for f in self.inputs]
        return [[f.path, s.st_size, s.st_mtime_ns] for f, s in zip(self.inputs, stats)]

    def _columns(self) -> dict[str, str]:
        if self.tokenizer:
            return {"tokens": f"ndarray:{self.tokenizer.dtype.name}:{self.options.seq_len}"}
        return {"text": "str", **dict(self.keep_fields)}

    def run(self) -> ConvertResult:
        """Convert (or finish converting) everything; raises ConvertError on bad input.

        Holds OUT's lock throughout, so a second job into the same OUT is refused at once.
        """
        with OutputLock(self.out):
            try:
                return self._run()
            except OutputError as err:
                raise ConvertError(f"OUT {err}") from None
            except OSError as err:
                raise self._os_error(err) from None

    def _os_error(self, err: OSError) -> ConvertError:
        """A one-line error for a file-system failure, naming OUT when it is OUT's fault."""
        inside = err.filename and os.path.abspath(err.filename).startswith(
            os.path.abspath(self.out) + os.sep
        )
        if inside or err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return ConvertError(f"OUT {output_error(self.out, err)}")
        where = f"{err.filename}: " if err.filename else ""
        return ConvertError(f"{where}{err.strerror or err}")

    def _run(self) -> ConvertResult:
        start = time.perf_counter()
        if self._already_done():
            return self.result
        done = self.work.open(self.job)
        self.done = done
        self.writer = ShardWriter(
            self.out,
            self._columns(),
            self.options.compression,
            self.options.size_limit,
            overwrite=True,
        )
        dedup = Deduper() if self.options.dedup else None
        if self.tokenizer:
            self.packer = TokenPacker(
                self.writer,
                self.options.seq_len,
                self.tokenizer.dtype,
                self.tokenizer.bos_id,
                self.tokenizer.eos_id,
                dedup,
            )
        else:
            self.packer = RawPacker(self.writer, 1 + len(self.keep_fields), dedup)
        self.dropped: Counter = Counter()
        self.bad: Counter = Counter()
        self.reports: list[FileReport] = []
        self._process_all()
        self._finish(start)
        return self.result

    def _already_done(self) -> bool:
        """True when OUT already holds this very job's dataset (a re-run after success);
        another dataset there is refused unless ``--overwrite``."""
        provenance = self._existing_provenance()
        if provenance is None:
            return False
        if provenance.get("job") == self.job_id:
            self._remove_work()
            self.result.already_done = True
            return True
        if not self.options.overwrite:
            raise ConvertError(
                f"{self.options.out} already holds a dataset; pass --overwrite to replace it"
            )
        return False

    def _existing_provenance(self) -> dict | None:
        """The provenance of the dataset in OUT ({} if unreadable), None if there is none."""
        if not (self.out / INDEX_NAME).exists():
            return None
        try:
            return load_index(self.out).provenance
        except (IndexFormatError, OSError):
            return {}

    def _remove_work(self) -> None:
        """The job's work folder, once OUT is known to be complete."""
        self.work.remove()

    def _executor(self):
        workers = self.options.workers or os.cpu_count() or 1
        setup = WorkerSetup(self.rules, self.tokenizer, os.getpid())
        if workers == 1:
            return _InlineExecutor(setup)
        # fork starts workers at once with the package already imported; elsewhere, spawn.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        return ProcessPoolExecutor(
            workers, mp_context=get_context(method), initializer=init_worker, initargs=(setup,)
        )

    def _process_all(self) -> None:
        """Read units in order, hand unfinished ones to workers, pack finished ones in order."""
        workers = self.options.workers or os.cpu_count() or 1
        in_flight = 2 * workers + 1
        pending: deque[tuple[str, int, Future | None]] = deque()
        self.bytes_before = 0
        executor = self._executor()
        try:
            for number, source in enumerate(self.inputs):
                report = FileReport(source.size)
                self.reports.append(report)
                units = read_units(
                    source, number, self.unit_bytes, self.options.txt_per_line, report
                )
                # A gzip unit is packed only once the file is read: damage found later in
                # the file may void it (see inputs._trusted_bytes).
                held: list[tuple[tuple[str, int, Future | None], int]] = []
                for unit in units:
                    if unit.read_error and self.options.on_error == "fail":
                        raise ConvertError(
                            f"{unit.read_error} (use --on-error skip to keep what was readable)"
                        )
                    if unit.name in self.done:
                        future = None
                        self.result.units_reused += 1
                    else:
                        future = executor.submit(
                            process_unit,
                            source.kind,
                            unit.payload,
                            source.path,
                            unit.first_line,
                            self.work.spill_path(unit.name),
                        )
                    entry = (unit.name, self.bytes_before + unit.end_pos, future)
                    if source.codec == "gzip":
                        held.append((entry, unit.end_offset))
                        _wait_for_room([e[2] for e, _ in held], in_flight)
                        continue
                    pending.append(entry)
                    while len(pending) >= in_flight:
                        self._pack(*pending.popleft())
                for entry, end_offset in held:
                    if report.trusted_bytes is None or end_offset <= report.trusted_bytes:
                        pending.append(entry)
                        while len(pending) >= in_flight:
                            self._pack(*pending.popleft())
                if report.read_error:
                    self.bad[UNREADABLE_FILE] += 1
                self.bytes_before += source.size
            while pending:
                self._pack(*pending.popleft())
        except BrokenProcessPool:
            raise ConvertError(
                "a worker process died (out of memory?); run the same command again to resume"
            ) from None
        finally:
            for _, _, future in pending:
                if future is not None:
                    future.cancel()
            executor.shutdown(wait=True, cancel_futures=True)

    def _pack(self, name: str, bytes_done: int, future: Future | None) -> None:
        if future is not None:
            future.result()
        stats, arrays = read_spill(self.work.spill_path(name))
        duplicates = self.packer.add(arrays)
        result = self.result
        result.units += 1
        result.documents_read += stats["read"]
        result.documents_written += stats["kept"] - duplicates
        result.bytes_read += stats["bytes_read"]
        result.tokens += stats["tokens"]
        self.dropped.update(stats["dropped"])
        self.bad.update(stats["errors"])
        if duplicates:
            self.dropped["duplicate"] += duplicates
        total = sum(f.size for f in self.inputs)
        self.report_progress(Progress(bytes_done, total, result.documents_written, result.tokens))

    def _finish(self, start: float) -> None:
        """Refuse an empty result; else record provenance, write the index, clean up."""
        result = self.result
        tail = None
        if self.tokenizer:
            pad_id = self.tokenizer.eos_id
            if pad_id is None:
                pad_id = self.tokenizer.bos_id
            tail = self.packer.finish(self.options.tail, pad_id)
        result.dropped = dict(sorted(self.dropped.items()))
        result.bad_records = dict(sorted(self.bad.items()))
        if self.packer.samples == 0:
            self.work.remove()
            self._remove_stale_shards(keep=set())
            what = (
                "documents" if not self.tokenizer else f"a full sequence of {self.options.seq_len}"
            )
            raise ConvertError(
                f"no {what} to write: read {result.documents_read} documents from "
                f"{len(self.inputs)} file(s), dropped {result.dropped or 'none'}, "
                f"skipped bad records {result.bad_records or 'none'}; no dataset written"
            )
        self.writer.provenance.update(self._provenance(tail))
        index = self.writer.close()
        self._remove_stale_shards(keep={s.file for s in index.shards})
        self.work.remove()
        if self.tokenizer:
            result.tokens = self.packer.document_tokens
        result.samples = index.num_samples
        result.shards = len(index.shards)
        result.bytes_in = sum(f.size for f in self.inputs)
        result.bytes_out = index.stored_bytes
        result.seconds = time.perf_counter() - start

    def _provenance(self, tail: dict | None) -> dict:
        o = self.options
        provenance = {
            "source": "streamshards convert",
            "job": self.job_id,
            "inputs": [
                {"file": f.path, "bytes": f.size, "xxh3_64": r.xxh3_64, "units": r.units}
                | ({"read_error": r.read_error} if r.read_error else {})
                for f, r in zip(self.inputs, self.reports)
            ],
            "options": {
                "text_field": o.text_field,
                "keep_fields": [f"{n}:{t}" for n, t in self.keep_fields],
                "txt_per_line": o.txt_per_line,
                "on_error": o.on_error,
                "unit_bytes": self.unit_bytes,
            },
            "filters": {
                "min_chars": o.min_chars,
                "max_chars": o.max_chars,
                "dedup": DEDUP_RULE if o.dedup else None,
                "filter": o.user_filter,
            },
            "documents": {
                "read": self.result.documents_read,
                "written": self.result.documents_written,
                "dropped": self.result.dropped,
                "bad_records_skipped": self.result.bad_records,
            },
            "bytes_read": self.result.bytes_read,
        }
        if self.tokenizer:
            packer = self.packer
            provenance.update(
                {
                    "tokenizer": self.tokenizer.provenance(),
                    "seq_len": o.seq_len,
                    "total_tokens": packer.samples * o.seq_len,
                    "document_tokens": packer.document_tokens,
                    "packing": {
                        "layout": _layout(self.tokenizer),
                        "tail": tail,
                    },
                }
            )
        return provenance

    def _remove_stale_shards(self, keep: set[str]) -> None:
        """Shard files of an earlier, different or interrupted job that the index does not list."""
        for entry in os.scandir(self.out):
            if SHARD_FILE.match(entry.name) and entry.name not in keep:
                os.unlink(entry.path)
        if not keep and all(p.name == LOCK_NAME for p in self.out.iterdir()):
            # Nothing was written: leave no folder behind. The lock file goes first, while
            # still held, so no other job can lock it in between.
            (self.out / LOCK_NAME).unlink(missing_ok=True)
            self.out.rmdir()


def _wait_for_room(futures: list[Future | None], in_flight: int) -> None:
    """Block until fewer than ``in_flight`` of ``futures`` are still running."""
    running = [f for f in futures if f is not None and not f.done()]
    while len(running) >= in_flight:
        wait(running, return_when=FIRST_COMPLETED)
        running = [f for f in running if not f.done()]


def _layout(info: TokenizerInfo) -> str:
    parts = (["BOS"] if info.bos_id is not None else []) + ["document"]
    parts += ["EOS"] if info.eos_id is not None else []
    return " ".join(parts) + ", repeated, cut every seq_len tokens"


class _InlineExecutor:
    """The one-worker case: each unit is processed in this process when it is submitted."""

    def __init__(self, setup: WorkerSetup):
        init_worker(setup)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Drop the tokenizer."""
        release_worker()
