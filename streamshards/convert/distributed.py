"""Convert on an engine (``--engine ray``): the same bytes as a local run, in three phases.

1. One task per input file reads that file itself, cuts it into the same units as a local run
   and writes each unit's spill file (reusing spills already there); it returns the file's
   hash and, per unit, its counts: token lengths (or sample sizes) and dedup keys.
2. The driver decides, in input order, which documents dedup keeps and plans shard
   boundaries from the prefix sums (``plan.py``): no input or token bytes pass through it.
3. One task per shard reads the spills it overlaps and writes the shard straight into OUT.

Every output has a deterministic name and appears by rename, and each finished task leaves a
small result file in the work folder, so a re-run after a crash reuses finished tasks and a
retried or duplicated task rewrites the same bytes. The driver checks every shard's size
and writes index.json last.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np

from streamshards.columns import parse_column_type
from streamshards.convert.engine import Engine, RetryableTaskError, Task, open_engine
from streamshards.convert.errors import ConvertError
from streamshards.convert.inputs import FileReport, InputFile, find_inputs, format_of, read_units
from streamshards.convert.options import Progress
from streamshards.convert.pack import Deduper
from streamshards.convert.plan import (
    ShardPlan,
    plan_raw_shards,
    plan_token_shards,
    rows_per_shard,
    sample_bytes,
    stream_length,
    token_rows,
    token_stream,
)
from streamshards.convert.run import UNREADABLE_FILE, ConvertJob
from streamshards.convert.spill import read_spill
from streamshards.convert.tokenize import TokenizerInfo
from streamshards.convert.worker import UnitProcessor, WorkerSetup
from streamshards.format import shard_chunks, write_shard
from streamshards.index import INDEX_NAME, Index, ShardInfo, creation_time, write_index
from streamshards.util import atomic_write, fsync_folder, is_remote, parse_size
from streamshards.writer import output_error, parse_compression, prepare_output

# Test hook: task name patterns (``read-000001``, ``shard-*``) that fail on their first
# attempt, and ``PATTERN:SECONDS`` pairs that stall it (to kill a node or the driver then).
# A marker file per task in FAULT_DIR (default: the work folder) remembers the first attempt.
FAIL_ONCE_ENV = "STREAMSHARDS_CONVERT_FAIL_ONCE"
STALL_ONCE_ENV = "STREAMSHARDS_CONVERT_STALL_ONCE"
FAULT_DIR_ENV = "STREAMSHARDS_CONVERT_FAULT_DIR"
MAX_RANGES = 32
RANGE_UNITS = 8


@dataclass(frozen=True)
class ReadSpec:
    """What a file task needs besides the file: how to cut it and what to return per unit."""

    unit_bytes: int
    txt_per_line: bool
    on_error: str
    setup: WorkerSetup
    units: str  # the work folder's spill folder
    num_columns: int  # raw mode: text plus kept fields


@dataclass(frozen=True)
class ShardSpec:
    """What a shard task needs besides its plan: the columns, the packing and OUT."""

    out: str
    columns: dict[str, str]
    level: int | None
    seq_len: int
    dtype: str | None  # token dtype; None in raw mode
    bos: int | None
    eos: int | None
    pad_id: int | None


def _first_attempt(marker: str | None, stall: float) -> None:
    """The test hook: on a task's first attempt, stall and/or fail (a marker file remembers)."""
    if marker is None or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).touch()
    if stall:
        time.sleep(stall)
    else:
        raise RetryableTaskError(f"injected failure ({FAIL_ONCE_ENV})")


_processors: dict[WorkerSetup, UnitProcessor] = {}


def read_file_task(
    source: InputFile,
    number: int,
    spec: ReadSpec,
    result_path: str,
    hook: tuple,
    byte_range: tuple[int, int | None] = (0, None),
) -> dict:
    """Phase 1: cut one file into units, write missing spills, return per-unit counts.

    With a byte range, only the units starting inside it are processed; the file is still
    cut from its start (finding newlines costs little next to tokenizing), so units are the
    same as a local run's, and the last range reads on to the end to hash the whole file.
    """
    _first_attempt(*hook)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one task is one core
    processor = _processors.get(spec.setup)
    if processor is None:
        processor = _processors[spec.setup] = UnitProcessor(spec.setup)
    report = FileReport(source.size)
    units, arrays, reused = [], {}, 0
    fetched = _fetch_input(source) if is_remote(source.path) else None
    reading = source if fetched is None else replace(source, path=fetched)
    try:
        for unit in read_units(reading, number, spec.unit_bytes, spec.txt_per_line, report):
            unit_start = unit.end_offset - len(unit.payload)
            if byte_range[1] is not None and unit_start >= byte_range[1]:
                break
            if unit_start < byte_range[0]:
                continue
            if unit.read_error and spec.on_error == "fail":
                error = unit.read_error.replace(reading.path, source.path)
                return {"error": f"{error} (use --on-error skip to keep what was readable)"}
            spill = Path(spec.units) / f"{unit.name}.npz"
            if spill.exists():
                reused += 1
            else:
                processor.process(source.kind, unit.payload, source.path, unit.first_line, spill)
            stats, counts, hashes = _spill_counts(spill, spec.num_columns)
            k = len(units)
            arrays[f"counts{k}"] = counts
            if hashes is not None:
                arrays[f"hashes{k}"] = hashes
            units.append({"name": unit.name, "end_offset": unit.end_offset, "stats": stats})
    except ConvertError as err:
        return {"error": str(err).replace(reading.path, source.path)}
    finally:
        if fetched is not None:
            os.unlink(fetched)
    if report.read_error:
        report.read_error = report.read_error.replace(reading.path, source.path)
    meta = {
        "report": {
            "xxh3_64": report.xxh3_64,
            "read_error": report.read_error,
            "units": report.units,
            "trusted_bytes": report.trusted_bytes,
        },
        "units": units,
        "reused": reused,
    }
    _write_result(Path(result_path), meta, arrays)
    return {"meta": meta, "arrays": arrays}


def _join_ranges(parts: list[dict]) -> dict:
    """One file's result from the results of its byte-range tasks, in range order."""
    units, arrays = [], {}
    for part in parts:
        for k, unit in enumerate(part["meta"]["units"]):
            for key in ("counts", "hashes"):
                if f"{key}{k}" in part["arrays"]:
                    arrays[f"{key}{len(units)}"] = part["arrays"][f"{key}{k}"]
            units.append(unit)
    reused = sum(part["meta"]["reused"] for part in parts)
    meta = {"report": parts[-1]["meta"]["report"], "units": units, "reused": reused}
    return {"meta": meta, "arrays": arrays}


def byte_ranges(source: InputFile, unit_bytes: int, txt_per_line: bool) -> list[tuple]:
    """Newline-aligned ranges for a large uncompressed line file (else the whole file).

    At most MAX_RANGES ranges of at least RANGE_UNITS units each; every range task cuts the
    file from its start, so more ranges would cost more reading than they save.
    """
    lines = source.kind == "jsonl" or (source.kind == "txt" and txt_per_line)
    count = min(MAX_RANGES, source.size // (RANGE_UNITS * unit_bytes))
    if not lines or source.codec is not None or is_remote(source.path) or count < 2:
        return [(0, None)]
    step = -(-source.size // count)
    return [(r * step, (r + 1) * step if r < count - 1 else None) for r in range(count)]


def find_any_inputs(specs: list[str]) -> list[InputFile]:
    """Like ``inputs.find_inputs``, and also ``s3://``/``gs://`` objects, prefixes and globs
    (a prefix is listed one level deep; matches are taken in name order)."""
    if not any(is_remote(spec) for spec in specs):
        return find_inputs(specs)
    found: list[InputFile] = []
    for spec in specs:
        found.extend(_remote_inputs(spec) if is_remote(spec) else find_inputs([spec]))
    seen: set[str] = set()
    unique = []
    for source in found:
        key = source.path if is_remote(source.path) else os.path.realpath(source.path)
        if key not in seen:
            seen.add(key)
            unique.append(source)
    return unique


def _remote_inputs(spec: str) -> list[InputFile]:
    from streamshards.storage import StorageError, open_storage

    parent, _, last = spec.rstrip("/").rpartition("/")
    try:
        if any(ch in last for ch in "*?["):
            objects = [o for o in open_storage(parent).list() if fnmatch(o.name, last)]
            root = parent
        elif format_of(last) and not spec.endswith("/"):
            objects, root = [open_storage(parent).stat(last)], parent
        else:
            objects, root = open_storage(spec.rstrip("/")).list(), spec.rstrip("/")
    except StorageError as err:
        raise ConvertError(f"input {spec}: {err}") from None
    except ValueError as err:
        raise ConvertError(f"input {spec}: {err}") from None
    inputs = []
    for info in objects:
        kind_codec = format_of(info.name)
        if kind_codec:
            inputs.append(InputFile(f"{root}/{info.name}", *kind_codec, info.size))
    if not inputs:
        raise ConvertError(f"input {spec!r} matches no supported file")
    return inputs


def _fetch_input(source: InputFile) -> str:
    """A worker reads its own input: a remote object is downloaded to a local temporary file."""
    from streamshards.storage import open_storage

    parent, _, name = source.path.rpartition("/")
    handle, path = tempfile.mkstemp(prefix="streamshards-input-", suffix=f"-{name}")
    os.close(handle)
    try:
        open_storage(parent).get(name, path, expected_size=source.size)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _spill_counts(spill: Path, num_columns: int) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """(stats, per-document token lengths or sample sizes, dedup keys) of one spill file."""
    stats, arrays = read_spill(spill)
    if "lengths" in arrays:
        counts = arrays["lengths"].astype(np.int64)
    else:
        sizes = sum(np.diff(arrays[f"offsets{k}"]) for k in range(num_columns))
        counts = sample_bytes(np.asarray(sizes, dtype=np.int64), num_columns)
    return stats, counts, arrays.get("hashes")


def _write_result(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """A finished task's result, atomically: it marks the task done for a re-run."""
    payload = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    payload.update(arrays)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **payload)
    os.replace(tmp, path)


def _read_result(path: Path) -> dict | None:
    """A finished task's result, or None when it has not finished."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError):
        return None
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    return {"meta": meta, "arrays": arrays}


def write_shard_task(
    name: str,
    plan: ShardPlan,
    spills: list[tuple[str, np.ndarray | None]],
    spec: ShardSpec,
    result_path: str,
    hook: tuple,
) -> dict:
    """Phase 3: build one planned shard from the spills it overlaps and write it into OUT."""
    _first_attempt(*hook)
    units = [(read_spill(Path(path))[1], keep) for path, keep in spills]
    values = shard_values(plan, units, spec)
    types = [parse_column_type(t, c) for c, t in spec.columns.items()]
    chunks = shard_chunks(list(zip(types, values)), plan.samples)
    out = Path(spec.out)
    tmp = out / f".{name}.{os.getpid()}.tmp"
    try:
        raw_bytes, stored_bytes, digest = write_shard(tmp, [b"".join(chunks)], spec.level)
        os.replace(tmp, out / name)
        fsync_folder(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise output_error(out, err) from None
    compression = "zstd" if spec.level is not None else None
    info = ShardInfo(name, plan.samples, raw_bytes, stored_bytes, digest, compression)
    atomic_write(Path(result_path), json.dumps(info.to_dict()).encode("utf-8"))
    return info.to_dict()


def shard_values(
    plan: ShardPlan, units: list[tuple[dict[str, np.ndarray], np.ndarray | None]], spec: ShardSpec
) -> list[list[bytes]]:
    """Per column, the encoded values of one planned shard (``units``: the spill arrays and
    keep mask of each of ``plan.pieces``' units)."""
    if spec.dtype is not None:
        dtype = np.dtype(spec.dtype)
        parts = []
        for piece, (arrays, keep) in zip(plan.pieces, units):
            lengths, tokens = arrays["lengths"], arrays["tokens"]
            stream = token_stream(lengths, tokens, keep, spec.bos, spec.eos, dtype)
            parts.append(stream[piece.start : piece.stop])
        stream = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
        return [token_rows(stream, spec.seq_len, plan.pad, spec.pad_id)]
    values: list[list[bytes]] = [[] for _ in spec.columns]
    for piece, (arrays, keep) in zip(plan.pieces, units):
        for k, column in enumerate(values):
            offsets = arrays[f"offsets{k}"]
            data = arrays[f"data{k}"].tobytes()
            kept = np.arange(len(offsets) - 1) if keep is None else np.flatnonzero(keep)
            column.extend(data[offsets[i] : offsets[i + 1]] for i in kept[piece.start : piece.stop])
    return values


@dataclass
class _Packed:
    """What ConvertJob's provenance reads from its packer."""

    samples: int
    document_tokens: int


class DistributedJob(ConvertJob):
    """A ConvertJob whose units and shards are tasks on an engine; same inputs, same bytes."""

    def __init__(self, options, progress=None, engine: Engine | None = None):
        super().__init__(options, progress)
        self._engine = engine

    def _find_inputs(self) -> list[InputFile]:
        return find_any_inputs(list(self.options.inputs))

    def _input_stamps(self) -> list[list]:
        """Local files as a local run stamps them; remote objects by URL and size."""
        return [
            [f.path, f.size, None] if is_remote(f.path) else [f.path, *_stamp(f.path)]
            for f in self.inputs
        ]

    def _run(self):
        start = time.perf_counter()
        if self._already_done():
            return self.result
        prepare_output(self.out)
        self.done = self.work.open(self.job)
        for folder in ("files", "shards", "faults"):
            (self.work.path / folder).mkdir(exist_ok=True)
        engine = self._engine or open_engine(self.options.engine, self.options.workers)
        try:
            engine.check_versions(_versions())
            files = self._read_files(engine)
            plans, units = self._plan(files)
            if self.packer.samples == 0:
                self._finish_empty()
            index_path = self.out / INDEX_NAME
            index_path.unlink(missing_ok=True)
            infos = self._write_shards(engine, plans, units)
        finally:
            if self._engine is None:
                engine.close()
        self._publish(infos, start)
        return self.result

    def _hook(self, name: str) -> tuple[str | None, float]:
        """The test hook's marker and stall for task ``name`` (None: no fault injected)."""
        fail = [p for p in os.environ.get(FAIL_ONCE_ENV, "").split(",") if p]
        stalls = [p.rsplit(":", 1) for p in os.environ.get(STALL_ONCE_ENV, "").split(",") if p]
        stall = next((float(s) for p, s in stalls if fnmatch(name, p)), 0.0)
        if not stall and not any(fnmatch(name, p) for p in fail):
            return None, 0.0
        folder = os.environ.get(FAULT_DIR_ENV) or str(self.work.path / "faults")
        return os.path.join(folder, name), stall

    def _report(self, bytes_done: int, documents: int, tokens: int) -> None:
        total = sum(f.size for f in self.inputs)
        self.report_progress(Progress(bytes_done, total, documents, tokens))

    def _read_files(self, engine: Engine) -> list[dict]:
        """Phase 1: every file's result, from an earlier run's result file or a new task."""
        setup = WorkerSetup(self.rules, _absolute(self.tokenizer), 0)
        spec = ReadSpec(
            self.unit_bytes,
            self.options.txt_per_line,
            self.options.on_error,
            setup,
            str(self.work.units.resolve()),
            1 + len(self.keep_fields),
        )
        parts: dict[tuple[int, int], dict] = {}
        ranges = [byte_ranges(f, self.unit_bytes, self.options.txt_per_line) for f in self.inputs]
        tasks = []
        for number, source in enumerate(self.inputs):
            for r, byte_range in enumerate(ranges[number]):
                part = f"{number:06d}" + (f"-{r:03d}" if len(ranges[number]) > 1 else "")
                path = self.work.path / "files" / f"{part}.npz"
                found = _read_result(path)
                if found is not None:
                    found["meta"]["reused"] = len(found["meta"]["units"])
                    parts[number, r] = found
                    continue
                name = f"read-{part}"
                absolute = source
                if not is_remote(source.path):
                    absolute = replace(source, path=os.path.abspath(source.path))
                args = (absolute, number, spec, str(path.resolve()), self._hook(name), byte_range)
                tasks.append(Task(name, read_file_task, args))
        bytes_done = documents = tokens = 0
        for name, result in engine.run(tasks):
            if "error" in result:
                raise ConvertError(result["error"])
            _, number, *r = name.split("-")
            parts[int(number), int(r[0]) if r else 0] = result
            bytes_done += self.inputs[int(number)].size // len(ranges[int(number)])
            for unit in result["meta"]["units"]:
                documents += unit["stats"]["kept"]
                tokens += unit["stats"]["tokens"]
            self._report(bytes_done, documents, tokens)
        return [
            _join_ranges([parts[number, r] for r in range(len(ranges[number]))])
            for number in range(len(self.inputs))
        ]

    def _plan(
        self, files: list[dict]
    ) -> tuple[list[ShardPlan], list[tuple[str, np.ndarray | None]]]:
        """Phase 2: dedup in input order, counts, and the shard plan; no input bytes needed."""
        result = self.result
        self.dropped, self.bad, self.reports = Counter(), Counter(), []
        dedup = Deduper() if self.options.dedup else None
        tk = self.tokenizer
        units: list[tuple[str, np.ndarray | None]] = []
        unit_counts: list = []
        document_tokens = 0
        for source, found in zip(self.inputs, files):
            meta, arrays = found["meta"], found["arrays"]
            report = FileReport(source.size, **meta["report"])
            self.reports.append(report)
            result.units_reused += meta["reused"]
            for k, unit in enumerate(meta["units"]):
                trusted = report.trusted_bytes
                if source.codec == "gzip" and trusted is not None and unit["end_offset"] > trusted:
                    continue
                stats, counts = unit["stats"], arrays[f"counts{k}"]
                keep = None
                if dedup is not None:
                    keep = np.array(dedup.keep(arrays.get(f"hashes{k}"), len(counts)), dtype=bool)
                    duplicates = int(len(counts) - keep.sum())
                    if duplicates:
                        self.dropped["duplicate"] += duplicates
                else:
                    duplicates = 0
                result.units += 1
                result.documents_read += stats["read"]
                result.documents_written += stats["kept"] - duplicates
                result.bytes_read += stats["bytes_read"]
                self.dropped.update(stats["dropped"])
                self.bad.update(stats["errors"])
                units.append((str((self.work.units / f"{unit['name']}.npz").resolve()), keep))
                kept = counts if keep is None else counts[keep]
                if tk is not None:
                    document_tokens += int(kept.sum())
                    unit_counts.append(stream_length(counts, keep, tk.bos_id, tk.eos_id))
                else:
                    unit_counts.append(kept)
            if report.read_error:
                self.bad[UNREADABLE_FILE] += 1
        if tk is not None:
            row_bytes = self.options.seq_len * tk.dtype.itemsize
            per_shard = rows_per_shard(row_bytes, parse_size(self.options.size_limit))
            plans, left = plan_token_shards(
                unit_counts, self.options.seq_len, per_shard, self.options.tail
            )
            if left and self.options.tail == "pad":
                pad_id = tk.eos_id if tk.eos_id is not None else tk.bos_id
                self.tail = {
                    "policy": "pad",
                    "tokens": left,
                    "pad_id": pad_id,
                    "pad_tokens": self.options.seq_len - left,
                }
            else:
                self.tail = {"policy": "drop", "tokens_dropped": left}
        else:
            plans = plan_raw_shards(unit_counts, parse_size(self.options.size_limit))
            self.tail = None
        self.packer = _Packed(sum(p.samples for p in plans), document_tokens)
        return plans, units

    def _finish_empty(self) -> None:
        """The same refusal as a local run when nothing would be written."""
        result = self.result
        result.dropped = dict(sorted(self.dropped.items()))
        result.bad_records = dict(sorted(self.bad.items()))
        self.work.remove()
        self._remove_stale_shards(keep=set())
        what = "documents" if not self.tokenizer else f"a full sequence of {self.options.seq_len}"
        raise ConvertError(
            f"no {what} to write: read {result.documents_read} documents from "
            f"{len(self.inputs)} file(s), dropped {result.dropped or 'none'}, "
            f"skipped bad records {result.bad_records or 'none'}; no dataset written"
        )

    def _write_shards(
        self, engine: Engine, plans: list[ShardPlan], units: list[tuple[str, np.ndarray | None]]
    ) -> list[ShardInfo]:
        """Phase 3: one task per shard not already written; the results in shard order."""
        tk = self.tokenizer
        level = parse_compression(self.options.compression)
        spec = ShardSpec(
            str(self.out.resolve()),
            self._columns(),
            level,
            self.options.seq_len,
            tk.dtype.str if tk is not None else None,
            tk.bos_id if tk is not None else None,
            tk.eos_id if tk is not None else None,
            (tk.eos_id if tk.eos_id is not None else tk.bos_id) if tk is not None else None,
        )
        suffix = ".ssd.zst" if level is not None else ".ssd"
        infos: dict[int, dict] = {}
        tasks = []
        for plan in plans:
            name = f"shard.{plan.number:06d}{suffix}"
            result_path = self.work.path / "shards" / f"{plan.number:06d}.json"
            found = _read_json(result_path)
            if found is not None and _size(self.out / name) == found["stored_bytes"]:
                infos[plan.number] = found
                continue
            spills = [units[p.unit] for p in plan.pieces]
            task_name = f"shard-{plan.number:06d}"
            tasks.append(
                Task(
                    task_name,
                    write_shard_task,
                    (name, plan, spills, spec, str(result_path.resolve()), self._hook(task_name)),
                )
            )
        for name, info in engine.run(tasks):
            infos[int(name.split("-")[1])] = info
        shards = []
        for number in range(len(plans)):
            info = infos[number]
            size = _size(self.out / info["file"])
            if size != info["stored_bytes"]:
                raise ConvertError(
                    f"OUT {self.out}: shard {info['file']} holds {size} bytes, its task wrote "
                    f"{info['stored_bytes']}; run the same command again"
                )
            shards.append(
                ShardInfo(
                    info["file"],
                    info["samples"],
                    info["raw_bytes"],
                    info["stored_bytes"],
                    info["hash"]["xxh3_64"],
                    info["compression"],
                )
            )
        return shards

    def _publish(self, shards: list[ShardInfo], start: float) -> None:
        """Write index.json (last), drop stale shards and the work folder, fill the result."""
        result = self.result
        result.dropped = dict(sorted(self.dropped.items()))
        result.bad_records = dict(sorted(self.bad.items()))
        provenance = {
            "tool": f"streamshards {_versions()['streamshards']}",
            "created": creation_time(),
        }
        provenance.update(self._provenance(self.tail))
        index = Index(self._columns(), shards, provenance)
        try:
            write_index(self.out, index)
        except OSError as err:
            raise output_error(self.out, err) from None
        self._remove_stale_shards(keep={s.file for s in shards})
        self.work.remove()
        if self.tokenizer:
            result.tokens = self.packer.document_tokens
        result.samples = index.num_samples
        result.shards = len(shards)
        result.bytes_in = sum(f.size for f in self.inputs)
        result.bytes_out = index.stored_bytes
        result.seconds = time.perf_counter() - start


def _versions() -> dict[str, str]:
    from streamshards.convert.ray_engine import library_versions

    return library_versions()


def _absolute(info: TokenizerInfo | None) -> TokenizerInfo | None:
    """The tokenizer with an absolute path: a task's working folder is not the driver's."""
    return None if info is None else replace(info, path=os.path.abspath(info.path))


def _stamp(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1
