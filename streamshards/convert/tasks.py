"""The tasks of an engine convert (``distributed.py``): plain functions of plain arguments.

``read_file_task`` cuts one input file (or a part of it: a byte range of a line file, a run of
row groups of a Parquet file) into the units of a local run and writes each unit's spill
file; ``write_shard_task`` builds one planned shard from the spills it overlaps and writes it
into OUT. Both write only deterministic names, each whole or not at all, and record their
result in the work area, so any number of attempts of one task leave the same bytes and a
re-run skips finished tasks.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import xxhash

from streamshards.columns import parse_column_type
from streamshards.convert.area import Area
from streamshards.convert.engine import RetryableTaskError
from streamshards.convert.errors import ConvertError
from streamshards.convert.inputs import (
    FileReport,
    InputFile,
    Unit,
    fetch_input,
    parquet_row_groups,
    parquet_unit_rows,
    parquet_units,
    read_units,
)
from streamshards.convert.plan import ShardPlan, sample_bytes, token_rows, token_stream
from streamshards.convert.spill import read_spill
from streamshards.convert.worker import UnitProcessor, WorkerSetup
from streamshards.format import shard_chunks, write_shard
from streamshards.index import ShardInfo
from streamshards.util import fsync_folder, is_remote
from streamshards.writer import output_error

# Test hook: task name patterns (``read-000001``, ``shard-*``) that fail on their first
# attempt, and ``PATTERN:SECONDS`` pairs that stall it (to kill a node or the driver then).
# A marker file per task in FAULT_DIR (default: one in the system temp folder) remembers the
# first attempt.
FAIL_ONCE_ENV = "STREAMSHARDS_CONVERT_FAIL_ONCE"
STALL_ONCE_ENV = "STREAMSHARDS_CONVERT_STALL_ONCE"
FAULT_DIR_ENV = "STREAMSHARDS_CONVERT_FAULT_DIR"
MAX_RANGES = 32
MIN_BUCKETS, MAX_BUCKETS, BUCKET_INPUT_BYTES = 4, 64, 4 << 30
RANGE_UNITS = 8
CHECK_BLOCK = 8 << 20


@dataclass(frozen=True)
class ReadSpec:
    """What a file task needs besides the file: how to cut it and what to return per unit."""

    unit_bytes: int
    txt_per_line: bool
    on_error: str
    setup: WorkerSetup
    work: Area  # the work folder (spills in units/, results in files/)
    num_columns: int  # raw mode: text plus kept fields
    buckets: int = 0  # --dedup: hash buckets the dedup keys are written into (keys/)


@dataclass(frozen=True)
class ShardSpec:
    """What a shard task needs besides its plan: the columns, the packing and OUT."""

    out: Area
    columns: dict[str, str]
    level: int | None
    seq_len: int
    dtype: str | None  # token dtype; None in raw mode
    bos: int | None
    eos: int | None
    pad_id: int | None
    work: Area | None = None  # where the spills are (None only where no task reads them)


@dataclass(frozen=True)
class Attempt:
    """A task's name, and the test hook's marker file and stall for it (None: no fault)."""

    name: str
    marker: str | None = None
    stall: float = 0.0


def _begin(attempt: Attempt, work: Area) -> None:
    """Count this attempt in the work area (for the retry count), then run the test hook."""
    work.write(f"attempts/{attempt.name}.{uuid.uuid4().hex[:12]}", b"")
    _first_attempt(attempt.marker, attempt.stall)


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
    result_name: str,
    attempt: Attempt,
    part: tuple[int, int | None] = (0, None),
) -> dict:
    """Phase 1: cut one file (or the ``part`` of it from ``file_ranges``) into units, write
    missing spills, return per-unit counts; the units are those of a local run (``_part_units``).
    """
    _begin(attempt, spec.work)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one task is one core
    processor = _processors.get(spec.setup)
    if processor is None:
        processor = _processors[spec.setup] = UnitProcessor(spec.setup)
    report = FileReport(source.size)
    units, arrays, reused, keys = [], {}, 0, []
    fetched = fetch_input(source) if is_remote(source.path) else None
    reading = source if fetched is None else replace(source, path=fetched)
    try:
        for unit in _part_units(reading, number, spec, report, part):
            if unit.read_error and spec.on_error == "fail":
                error = unit.read_error.replace(reading.path, source.path)
                return {"error": f"{error} (use --on-error skip to keep what was readable)"}
            spill = f"units/{unit.name}.npz"
            if spec.work.size(spill) >= 0:
                reused += 1
                with spec.work.fetched(spill) as path:
                    stats, counts, hashes = _spill_counts(path, spec.num_columns)
            else:
                path = spec.work.local_path(spill) or _temporary(unit.name)
                processor.process(source.kind, unit.payload, source.path, unit.first_line, path)
                stats, counts, hashes = _spill_counts(path, spec.num_columns)
                if spec.work.remote:
                    spec.work.upload(path, spill)
            arrays[f"counts{len(units)}"] = counts
            if hashes is not None:
                keys.append((unit_code(unit.file, unit.number), hashes))
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
    if spec.buckets:
        write_keys(spec.work, Path(result_name).stem, keys, spec.buckets)
    _write_result(spec.work, result_name, meta, arrays)
    return {"meta": meta, "arrays": arrays}


def dedup_buckets(input_bytes: int) -> int:
    """Hash buckets for --dedup: about one a 4 GB of input (C4 en: 64), at least 4."""
    return max(MIN_BUCKETS, min(MAX_BUCKETS, input_bytes // BUCKET_INPUT_BYTES))


def unit_code(file: int, number: int) -> int:
    """A unit's place in input order as one integer (file, then unit within it)."""
    return (file << 32) | number


def write_keys(work: Area, part: str, keys: list[tuple[int, np.ndarray]], buckets: int) -> None:
    """This part's dedup keys with their places (unit, document), one file per hash bucket."""
    units = [np.full(len(h) // 16, code, dtype=np.int64) for code, h in keys]
    docs = [np.arange(len(h) // 16, dtype=np.int64) for _, h in keys]
    raw = [h.reshape(-1, 16) for _, h in keys]
    units = np.concatenate(units) if units else np.empty(0, dtype=np.int64)
    docs = np.concatenate(docs) if docs else np.empty(0, dtype=np.int64)
    pairs = np.concatenate(raw).view("<u8") if raw else np.empty((0, 2), dtype="<u8")
    bucket = pairs[:, 0] % buckets if len(pairs) else np.empty(0, dtype="<u8")
    for b in range(buckets):
        mine = bucket == b
        buffer = io.BytesIO()
        np.savez(buffer, units=units[mine], docs=docs[mine], keys=pairs[mine])
        work.write(f"keys/{part}.{b:03d}.npz", buffer.getvalue())


def dedup_bucket_task(
    bucket: int, parts: list[str], dropped_units: list[int], work: Area, attempt: Attempt
) -> dict:
    """Exact dedup of one hash bucket: every document whose key occurred earlier in input
    order (over units that are packed) is a duplicate; returns their (unit, document)."""
    _begin(attempt, work)
    loaded = []
    for part in parts:
        data = work.read(f"keys/{part}.{bucket:03d}.npz")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            loaded.append((arrays["units"], arrays["docs"], arrays["keys"]))
    units = np.concatenate([u for u, _, _ in loaded])
    docs = np.concatenate([d for _, d, _ in loaded])
    keys = np.concatenate([k for _, _, k in loaded]).reshape(-1, 2)
    packed = ~np.isin(units, np.asarray(dropped_units, dtype=np.int64))
    units, docs, keys = units[packed], docs[packed], keys[packed]
    order = np.lexsort((docs, units, keys[:, 1], keys[:, 0]))
    keys = keys[order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = (keys[1:] == keys[:-1]).all(axis=1)
    duplicates = {"units": units[order][repeat], "docs": docs[order][repeat]}
    buffer = io.BytesIO()
    np.savez(buffer, **duplicates)
    work.write(f"dups/{bucket:03d}.npz", buffer.getvalue())
    return duplicates


def _part_units(
    source: InputFile, number: int, spec: ReadSpec, report: FileReport, part: tuple[int, int | None]
) -> Iterator[Unit]:
    """The units of a local run that start in ``part``: a Parquet task reads from its first
    row group on; a byte-range task still cuts the file from its start (finding newlines costs
    little next to tokenizing). The part that runs to the file's end hashes the whole file."""
    if source.kind == "parquet":
        yield from parquet_units(source, number, spec.unit_bytes, report, part)
        return
    units = read_units(source, number, spec.unit_bytes, spec.txt_per_line, report)
    if part == (0, None):
        yield from units
        return
    for unit in units:
        unit_start = unit.end_offset - len(unit.payload)
        if part[1] is not None and unit_start >= part[1]:
            return
        if unit_start >= part[0]:
            yield unit


def _temporary(name: str) -> Path:
    """A local file name for output on its way to a remote area."""
    return Path(tempfile.gettempdir()) / f"streamshards-{os.getpid()}-{name}.npz"


def join_ranges(parts: list[dict]) -> dict:
    """One file's result from the results of its part tasks (``file_ranges``), in order."""
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


def file_ranges(source: InputFile, unit_bytes: int, txt_per_line: bool) -> list[tuple]:
    """The parts of one file, one read task each: row groups of a local Parquet file, byte
    ranges of a large uncompressed line file, else the whole file."""
    if source.kind == "parquet" and not is_remote(source.path):
        return row_group_ranges(source, unit_bytes)
    return byte_ranges(source, unit_bytes, txt_per_line)


def row_group_ranges(source: InputFile, unit_bytes: int) -> list[tuple]:
    """Runs of row groups of a local Parquet file with many units (else the whole file).

    At most MAX_RANGES runs of about equal rows and at least RANGE_UNITS units each; a run's
    task reads its own row groups, and on into the next to finish its last unit.
    """
    try:
        groups = parquet_row_groups(source.path)
    except ConvertError:
        return [(0, None)]  # the file's one task meets the error as a local run does
    starts = np.concatenate([[0], np.cumsum(groups, dtype=np.int64)])
    units = -(-int(starts[-1]) // parquet_unit_rows(unit_bytes))
    count = min(MAX_RANGES, len(groups), units // RANGE_UNITS)
    if count < 2:
        return [(0, None)]
    targets = [starts[-1] * r / count for r in range(1, count)]
    cuts = sorted({int(np.searchsorted(starts, t)) for t in targets} - {0, len(groups)})
    bounds = [0, *cuts]
    return [(a, b) for a, b in zip(bounds, [*cuts, None])]


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


def _spill_counts(spill: Path, num_columns: int) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """(stats, per-document token lengths or sample sizes, dedup keys) of one spill file."""
    stats, arrays = read_spill(spill)
    if "lengths" in arrays:
        counts = arrays["lengths"].astype(np.int64)
    else:
        sizes = sum(np.diff(arrays[f"offsets{k}"]) for k in range(num_columns))
        counts = sample_bytes(np.asarray(sizes, dtype=np.int64), num_columns)
    return stats, counts, arrays.get("hashes")


def _write_result(area: Area, name: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """A finished task's result, atomically: it marks the task done for a re-run."""
    payload = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    payload.update(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    area.write(name, buffer.getvalue())


def read_result(area: Area, name: str) -> dict | None:
    """A finished task's result, or None when it has not finished."""
    data = area.read(name)
    if data is None:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    return {"meta": meta, "arrays": arrays}


def write_shard_task(
    name: str,
    plan: ShardPlan,
    spills: list[tuple[str, np.ndarray | None]],
    spec: ShardSpec,
    result_name: str,
    attempt: Attempt,
) -> dict:
    """Phase 4: build one planned shard from the spills it overlaps and write it into OUT."""
    _begin(attempt, spec.work)
    units = []
    for spill, keep in spills:
        with spec.work.fetched(spill) as path:
            units.append((read_spill(path)[1], keep))
    values = shard_values(plan, units, spec)
    types = [parse_column_type(t, c) for c, t in spec.columns.items()]
    chunks = [b"".join(shard_chunks(list(zip(types, values)), plan.samples))]
    out = spec.out.local_path("")
    tmp = _temporary(name) if out is None else out / f".{name}.{os.getpid()}.tmp"
    try:
        raw_bytes, stored_bytes, digest = write_shard(tmp, chunks, spec.level)
        if out is None:
            spec.out.upload(tmp, name)
        else:
            os.replace(tmp, out / name)
            fsync_folder(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise output_error(spec.out.root, err) from None
    compression = "zstd" if spec.level is not None else None
    info = ShardInfo(name, plan.samples, raw_bytes, stored_bytes, digest, compression)
    spec.work.write(result_name, json.dumps(info.to_dict()).encode("utf-8"))
    return info.to_dict()


def check_shard_task(area: Area, name: str) -> dict:
    """Phase 4, after the writes: the size and xxh3-64 of shard ``name`` as OUT holds it, read
    back on a node (never through the driver), for the driver to compare with the index."""
    digest = xxhash.xxh3_64()
    size = 0
    with area.fetched(name) as path, open(path, "rb") as f:
        while block := f.read(CHECK_BLOCK):
            digest.update(block)
            size += len(block)
    return {"file": name, "stored_bytes": size, "xxh3_64": digest.hexdigest()}


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
