"""Convert on an engine (``--engine ray``): the same bytes as a local run, in four phases.

1. One task per input file (or byte range, or run of Parquet row groups) reads that file
   itself, cuts it into the same units as a local run and writes each unit's spill file
   (reusing spills already there); it returns the file's hash and, per unit, its counts and
   per-document token lengths (or sample sizes); with --dedup it writes the documents' keys
   into hash-bucket files.
2. With --dedup, one task per bucket finds the later occurrences of each key, in input order.
3. The driver plans shard boundaries from the prefix sums (``plan.py``): no input or token
   bytes pass through it.
4. One task per shard reads the spills it overlaps and writes the shard straight into OUT.

Every output has a deterministic name and appears whole or not at all, and each finished task
leaves a small result file in the work area, so a re-run after a crash reuses finished tasks
and a retried or duplicated task rewrites the same bytes. The driver checks every shard's
size and writes index.json last.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np

from streamshards.convert.area import Area
from streamshards.convert.engine import Engine, Task
from streamshards.convert.engines import open_engine
from streamshards.convert.errors import ConvertError
from streamshards.convert.inputs import FileReport, InputFile, find_any_inputs
from streamshards.convert.options import ConvertOptions, ConvertResult, Progress
from streamshards.convert.plan import (
    ShardPlan,
    plan_raw_shards,
    plan_token_shards,
    rows_per_shard,
    stream_length,
)
from streamshards.convert.run import SHARD_FILE, UNREADABLE_FILE, ConvertJob
from streamshards.convert.spill import JOB_NAME, WORK_NAME
from streamshards.convert.tasks import (
    FAIL_ONCE_ENV,
    FAULT_DIR_ENV,
    STALL_ONCE_ENV,
    Attempt,
    ReadSpec,
    ShardSpec,
    check_shard_task,
    dedup_bucket_task,
    dedup_buckets,
    file_ranges,
    join_ranges,
    read_file_task,
    read_result,
    unit_code,
    write_shard_task,
)
from streamshards.convert.tokenize import TokenizerInfo
from streamshards.convert.worker import WorkerSetup
from streamshards.index import (
    INDEX_NAME,
    Index,
    IndexFormatError,
    ShardInfo,
    creation_time,
    index_bytes,
    parse_index_bytes,
    write_index,
)
from streamshards.util import is_remote, parse_size
from streamshards.writer import OutputError, output_error, parse_compression, prepare_output

WORK_FOLDERS = ("units", "files", "keys", "dups", "shards", "attempts")


@dataclass
class _Packed:
    """What ConvertJob's provenance reads from its packer."""

    samples: int
    document_tokens: int


class DistributedJob(ConvertJob):
    """A ConvertJob whose units and shards are tasks on an engine; same inputs, same bytes."""

    def __init__(
        self,
        options: ConvertOptions,
        progress: Callable[[Progress], None] | None = None,
        engine: Engine | None = None,
    ):
        super().__init__(options, progress)
        self._engine = engine
        out = options.out if is_remote(options.out) else os.path.abspath(options.out)
        self.out_area = Area(out.rstrip("/"))
        self.work_area = self.out_area.sub(WORK_NAME)

    def run(self) -> ConvertResult:
        """As ConvertJob.run; a remote OUT is written directly, its lock held by the caller."""
        if not self.out_area.remote:
            return super().run()
        try:
            return self._run()
        except OutputError as err:
            raise ConvertError(f"OUT {err}") from None

    def _find_inputs(self) -> list[InputFile]:
        return find_any_inputs(list(self.options.inputs))

    def _input_stamps(self) -> list[list]:
        """Local files as a local run stamps them; remote objects by URL and size."""
        return [
            [f.path, f.size, None] if is_remote(f.path) else [f.path, *_stamp(f.path)]
            for f in self.inputs
        ]

    def _existing_provenance(self) -> dict | None:
        """As ConvertJob's, read through the OUT area (a shared folder or a bucket prefix)."""
        data = self.out_area.read(INDEX_NAME)
        if data is None:
            return None
        try:
            return parse_index_bytes(data, self.out_area.url(INDEX_NAME)).provenance
        except (IndexFormatError, ValueError):
            return {}

    def _remove_work(self) -> None:
        """The work area's folders, wherever the area is."""
        self.work_area.remove_all(WORK_FOLDERS)

    def _open_work(self) -> None:
        """Start or resume this job's work area (wiping one of a different job)."""
        found = self.work_area.read(JOB_NAME)
        job = json.dumps(self.job, indent=1, sort_keys=True).encode("utf-8")
        if found is not None and json.loads(found) != json.loads(job):
            self.work_area.remove_all(WORK_FOLDERS)
            found = None
        if not self.work_area.remote:
            for folder in WORK_FOLDERS:
                Path(self.work_area.root, folder).mkdir(parents=True, exist_ok=True)
        if found is None:
            self.work_area.write(JOB_NAME, job)

    def _run(self) -> ConvertResult:
        start = time.perf_counter()
        if self._already_done():
            return self.result
        if not self.out_area.remote:
            prepare_output(self.out)
        self._open_work()
        engine = self._engine or open_engine(self.options.engine, self.options.workers)
        self.tasks_done = self.tasks_total = 0
        self.result.engine = self.options.engine
        try:
            engine.check_versions(_versions())
            self.buckets = (
                dedup_buckets(sum(f.size for f in self.inputs)) if self.options.dedup else 0
            )
            files = self._read_files(engine)
            duplicates = self._dedup(engine, files) if self.buckets else {}
            plans, units = self._plan(files, duplicates)
            if self.packer.samples == 0:
                self._finish_empty()
            self.out_area.delete(INDEX_NAME)
            infos = self._write_shards(engine, plans, units)
            last_task = time.perf_counter()
            self._publish(infos, start)
            self.result.publish_seconds = time.perf_counter() - last_task
        finally:
            if self._engine is None:
                engine.close()
        return self.result

    def _remove_stale(self, keep: set[str]) -> None:
        """Shard files that the new index does not list (of an earlier or different job)."""
        if not self.out_area.remote:
            self._remove_stale_shards(keep)
            return
        for name in self.out_area.names():
            if SHARD_FILE.match(name) and name not in keep:
                self.out_area.delete(name)

    def _attempt(self, name: str) -> Attempt:
        """Task ``name`` with the test hook's marker and stall for it, if any."""
        fail = [p for p in os.environ.get(FAIL_ONCE_ENV, "").split(",") if p]
        stalls = [p.rsplit(":", 1) for p in os.environ.get(STALL_ONCE_ENV, "").split(",") if p]
        stall = next((float(s) for p, s in stalls if fnmatch(name, p)), 0.0)
        if not stall and not any(fnmatch(name, p) for p in fail):
            return Attempt(name)
        folder = os.environ.get(FAULT_DIR_ENV) or os.path.join(
            tempfile.gettempdir(), f"streamshards-faults-{self.job_id}"
        )
        return Attempt(name, os.path.join(folder, name), stall)

    def _report(self, bytes_done: int, documents: int, tokens: int) -> None:
        total = sum(f.size for f in self.inputs)
        self.report_progress(
            Progress(bytes_done, total, documents, tokens, self.tasks_done, self.tasks_total)
        )

    def _count_tasks(self) -> None:
        """Tasks run and attempts retried (each attempt leaves a marker in the work area)."""
        attempts = self.work_area.sub("attempts").names()
        self.result.tasks = self.tasks_done
        self.result.tasks_retried = len(attempts) - len({a.rsplit(".", 1)[0] for a in attempts})

    def _read_files(self, engine: Engine) -> list[dict]:
        """Phase 1: every file's result, from an earlier run's result file or a new task."""
        setup = WorkerSetup(self.rules, _absolute(self.tokenizer), 0)
        spec = ReadSpec(
            self.unit_bytes,
            self.options.txt_per_line,
            self.options.on_error,
            setup,
            self.work_area,
            1 + len(self.keep_fields),
            self.buckets,
        )
        parts: dict[tuple[int, int], dict] = {}
        ranges = [file_ranges(f, self.unit_bytes, self.options.txt_per_line) for f in self.inputs]
        tasks = []
        self.part_names = []
        for number, source in enumerate(self.inputs):
            for r, part_range in enumerate(ranges[number]):
                part = f"{number:06d}" + (f"-{r:03d}" if len(ranges[number]) > 1 else "")
                self.part_names.append(part)
                result_name = f"files/{part}.npz"
                found = read_result(self.work_area, result_name)
                if found is not None:
                    found["meta"]["reused"] = len(found["meta"]["units"])
                    parts[number, r] = found
                    continue
                name = f"read-{part}"
                absolute = source
                if not is_remote(source.path):
                    absolute = replace(source, path=os.path.abspath(source.path))
                args = (absolute, number, spec, result_name, self._attempt(name), part_range)
                tasks.append(Task(name, read_file_task, args))
        bytes_done = sum(self.inputs[n].size // len(ranges[n]) for n, _ in parts)
        documents = tokens = 0
        self.tasks_total += len(tasks)
        errors: dict[tuple[int, int], str] = {}
        for name, result in engine.run(tasks):
            self.tasks_done += 1
            _, number, *r = name.split("-")
            key = int(number), int(r[0]) if r else 0
            if "error" in result:
                errors[key] = result["error"]
            else:
                parts[key] = result
            if errors:
                # The error a local run would meet first: wait for every earlier part.
                first = min(errors)
                earlier = [(n, i) for n in range(first[0] + 1) for i in range(len(ranges[n]))]
                if all(k in parts or k in errors for k in earlier if k < first):
                    raise ConvertError(errors[first])
                continue
            bytes_done += self.inputs[int(number)].size // len(ranges[int(number)])
            for unit in result["meta"]["units"]:
                documents += unit["stats"]["kept"]
                tokens += unit["stats"]["tokens"]
            self._report(bytes_done, documents, tokens)
        return [
            join_ranges([parts[number, r] for r in range(len(ranges[number]))])
            for number in range(len(self.inputs))
        ]

    def _dedup(self, engine: Engine, files: list[dict]) -> dict[int, np.ndarray]:
        """Phase 2, exact dedup in hash-bucket tasks: per unit (code), its duplicate documents."""
        dropped_units = []
        for number, (source, found) in enumerate(zip(self.inputs, files)):
            trusted = found["meta"]["report"]["trusted_bytes"]
            if source.codec == "gzip" and trusted is not None:
                dropped_units += [
                    unit_code(number, int(u["name"].split("-")[1]))
                    for u in found["meta"]["units"]
                    if u["end_offset"] > trusted
                ]
        found: dict[int, dict] = {}
        tasks = []
        for bucket in range(self.buckets):
            data = self.work_area.read(f"dups/{bucket:03d}.npz")
            if data is not None:
                with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                    found[bucket] = {key: arrays[key] for key in arrays.files}
                continue
            name = f"dedup-{bucket:03d}"
            args = (bucket, self.part_names, dropped_units, self.work_area, self._attempt(name))
            tasks.append(Task(name, dedup_bucket_task, args))
        self.tasks_total += len(tasks)
        for name, result in engine.run(tasks):
            self.tasks_done += 1
            found[int(name.split("-")[1])] = result
        units = np.concatenate([found[b]["units"] for b in range(self.buckets)])
        docs = np.concatenate([found[b]["docs"] for b in range(self.buckets)])
        order = np.argsort(units, kind="stable")
        units, docs = units[order], docs[order]
        starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]]) if len(units) else []
        bounds = list(starts) + [len(units)]
        return {int(units[a]): docs[a:b] for a, b in zip(bounds, bounds[1:])}

    def _plan(
        self, files: list[dict], duplicates: dict[int, np.ndarray]
    ) -> tuple[list[ShardPlan], list[tuple[str, np.ndarray | None]]]:
        """Phase 3: counts and the shard plan from the tasks' results; no input bytes needed."""
        result = self.result
        self.dropped, self.bad, self.reports = Counter(), Counter(), []
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
                if self.buckets:
                    keep = np.ones(len(counts), dtype=bool)
                    number, unit_number = map(int, unit["name"].split("-"))
                    keep[duplicates.get(unit_code(number, unit_number), [])] = False
                dropped = 0 if keep is None else int(len(counts) - keep.sum())
                if dropped:
                    self.dropped["duplicate"] += dropped
                result.units += 1
                result.documents_read += stats["read"]
                result.documents_written += stats["kept"] - dropped
                result.bytes_read += stats["bytes_read"]
                self.dropped.update(stats["dropped"])
                self.bad.update(stats["errors"])
                units.append((f"units/{unit['name']}.npz", keep))
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
        self.work_area.remove_all(WORK_FOLDERS)
        self._remove_stale(keep=set())
        what = "documents" if not self.tokenizer else f"a full sequence of {self.options.seq_len}"
        raise ConvertError(
            f"no {what} to write: read {result.documents_read} documents from "
            f"{len(self.inputs)} file(s), dropped {result.dropped or 'none'}, "
            f"skipped bad records {result.bad_records or 'none'}; no dataset written"
        )

    def _write_shards(
        self, engine: Engine, plans: list[ShardPlan], units: list[tuple[str, np.ndarray | None]]
    ) -> list[ShardInfo]:
        """Phase 4: one task per shard not already written; the results in shard order."""
        tk = self.tokenizer
        level = parse_compression(self.options.compression)
        spec = ShardSpec(
            self.out_area,
            self._columns(),
            level,
            self.options.seq_len,
            tk.dtype.str if tk is not None else None,
            tk.bos_id if tk is not None else None,
            tk.eos_id if tk is not None else None,
            (tk.eos_id if tk.eos_id is not None else tk.bos_id) if tk is not None else None,
            self.work_area,
        )
        suffix = ".ssd.zst" if level is not None else ".ssd"
        infos: dict[int, dict] = {}
        tasks = []
        for plan in plans:
            name = f"shard.{plan.number:06d}{suffix}"
            result_name = f"shards/{plan.number:06d}.json"
            found = _read_json(self.work_area, result_name)
            if found is not None and self.out_area.size(name) == found["stored_bytes"]:
                infos[plan.number] = found
                continue
            spills = [units[p.unit] for p in plan.pieces]
            task_name = f"shard-{plan.number:06d}"
            tasks.append(
                Task(
                    task_name,
                    write_shard_task,
                    (name, plan, spills, spec, result_name, self._attempt(task_name)),
                )
            )
        self.tasks_total += len(tasks)
        bytes_in = sum(f.size for f in self.inputs)
        for name, info in engine.run(tasks):
            infos[int(name.split("-")[1])] = info
            self.tasks_done += 1
            self._report(bytes_in, self.result.documents_written, self.packer.document_tokens)
        checks = [
            Task(f"check-{n:06d}", check_shard_task, (self.out_area, infos[n]["file"]))
            for n in range(len(plans))
        ]
        self.tasks_total += len(checks)
        stored = {}
        for name, found in engine.run(checks):
            stored[int(name.split("-")[1])] = found
            self.tasks_done += 1
        shards = []
        for number in range(len(plans)):
            info, found = infos[number], stored[number]
            wrote = (info["stored_bytes"], info["hash"]["xxh3_64"])
            if (found["stored_bytes"], found["xxh3_64"]) != wrote:
                self.work_area.delete(f"shards/{number:06d}.json")  # a re-run writes it again
                raise ConvertError(
                    f"OUT {self.options.out}: shard {info['file']} holds {found['stored_bytes']} "
                    f"bytes with xxh3-64 {found['xxh3_64']}, its task wrote {wrote[0]} bytes "
                    f"with {wrote[1]}; run the same command again"
                )
            shards.append(ShardInfo.from_dict(info))
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
        if self.out_area.remote:
            self.out_area.write(INDEX_NAME, index_bytes(index))
        else:
            try:
                write_index(self.out, index)
            except OSError as err:
                raise output_error(self.out, err) from None
        self._remove_stale(keep={s.file for s in shards})
        self._count_tasks()
        self.work_area.remove_all(WORK_FOLDERS)
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


def _read_json(area: Area, name: str) -> Any:
    data = area.read(name)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        return None
