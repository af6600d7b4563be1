"""A shard plan plus per-shard packing writes exactly the shards of the one-process writer.

``--engine ray`` cuts shards from per-unit counts and packs each shard alone; the local run
feeds every unit, in order, through TokenPacker/RawPacker into one ShardWriter. For random
documents, unit splits, duplicates, ``seq_len``, BOS/EOS, ``--tail`` and size limits, both
give the same shard files, byte for byte.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from convert_helpers import TOKENIZER, dataset_files, sample_docs, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshards.columns import parse_column_type
from streamshards.convert import ConvertError, ConvertOptions, convert
from streamshards.convert.area import Area
from streamshards.convert.distributed import DistributedJob
from streamshards.convert.engine import LocalEngine
from streamshards.convert.inputs import (
    FileReport,
    find_inputs,
    parquet_row_groups,
    parquet_unit_rows,
    parquet_units,
)
from streamshards.convert.merge_engine import merge_on_engine
from streamshards.convert.pack import Deduper, RawPacker, TokenPacker
from streamshards.convert.plan import (
    plan_raw_shards,
    plan_token_shards,
    rows_per_shard,
    sample_bytes,
    stream_length,
)
from streamshards.convert.spill import WORK_NAME
from streamshards.convert.tasks import (
    FAIL_ONCE_ENV,
    FAULT_DIR_ENV,
    STALL_ONCE_ENV,
    Attempt,
    ShardSpec,
    byte_ranges,
    dedup_bucket_task,
    file_ranges,
    shard_values,
    unit_code,
    write_keys,
)
from streamshards.format import shard_chunks
from streamshards.merge import merge
from streamshards.writer import ShardWriter

DTYPE = np.dtype("<u2")

# A unit is a list of documents; a document is (dedup key, length); few keys, so duplicates.
documents = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 30)), max_size=12)
units_strategy = st.lists(documents, min_size=1, max_size=6)


def _key(number: int) -> bytes:
    return number.to_bytes(16, "little")


def _token_units(units: list, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for docs in units:
        lengths = np.array([n for _, n in docs], dtype=np.int64)
        out.append(
            {
                "lengths": lengths,
                "tokens": rng.integers(0, 60000, int(lengths.sum()), dtype=np.int64).astype(DTYPE),
                "hashes": np.frombuffer(b"".join(_key(k) for k, _ in docs), dtype=np.uint8),
            }
        )
    return out


def _raw_units(units: list, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for docs in units:
        arrays = {"hashes": np.frombuffer(b"".join(_key(k) for k, _ in docs), dtype=np.uint8)}
        for column in range(2):
            values = [rng.bytes(n if column == 0 else n % 7) for _, n in docs]
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum([len(v) for v in values], out=offsets[1:])
            arrays[f"offsets{column}"] = offsets
            arrays[f"data{column}"] = np.frombuffer(b"".join(values), dtype=np.uint8)
        out.append(arrays)
    return out


def _local_shards(columns: dict, size_limit: int, feed) -> list[bytes]:
    """Shard files (uncompressed) written by one ShardWriter fed by ``feed(writer)``."""
    with tempfile.TemporaryDirectory() as folder:
        writer = ShardWriter(folder, columns, None, size_limit)
        feed(writer)
        index = writer.close()
        return [(Path(folder) / s.file).read_bytes() for s in index.shards]


def _planned_shards(columns: dict, plans, arrays, keeps, spec: ShardSpec) -> list[bytes]:
    types = [parse_column_type(t, c) for c, t in columns.items()]
    shards = []
    for plan in plans:
        units = [(arrays[p.unit], keeps[p.unit]) for p in plan.pieces]
        values = shard_values(plan, units, spec)
        shards.append(b"".join(shard_chunks(list(zip(types, values)), plan.samples)))
    return shards


def _keeps(arrays: list[dict], dedup: bool, count_key: str) -> list[np.ndarray | None]:
    """Each unit's kept documents, deciding duplicates in unit order as the driver does."""
    deduper = Deduper()
    keeps = []
    for a in arrays:
        count = len(a[count_key]) - (count_key.startswith("offsets"))
        keeps.append(np.array(deduper.keep(a["hashes"], count), dtype=bool) if dedup else None)
    return keeps


@settings(max_examples=60, deadline=None)
@given(
    units=units_strategy,
    seed=st.integers(0, 1000),
    seq_len=st.integers(1, 24),
    size_limit=st.integers(1, 400),
    bos=st.sampled_from([None, 1]),
    eos=st.sampled_from([None, 0]),
    tail=st.sampled_from(["drop", "pad"]),
    dedup=st.booleans(),
)
def test_planned_token_shards_equal_the_token_packer(
    units, seed, seq_len, size_limit, bos, eos, tail, dedup
):
    arrays = _token_units(units, seed)
    columns = {"tokens": f"ndarray:uint16:{seq_len}"}
    pad_id = eos if eos is not None else bos
    if tail == "pad" and pad_id is None:
        pad_id = 0

    def feed(writer):
        packer = TokenPacker(writer, seq_len, DTYPE, bos, eos, Deduper() if dedup else None)
        for unit in arrays:
            packer.add({k: v for k, v in unit.items() if dedup or k != "hashes"})
        feed.left = packer.finish(tail, pad_id)

    local = _local_shards(columns, size_limit, feed)
    keeps = _keeps(arrays, dedup, "lengths")
    counts = [stream_length(a["lengths"], k, bos, eos) for a, k in zip(arrays, keeps)]
    per_shard = rows_per_shard(seq_len * DTYPE.itemsize, size_limit)
    plans, left = plan_token_shards(counts, seq_len, per_shard, tail)
    spec = ShardSpec(Area(""), columns, None, seq_len, DTYPE.str, bos, eos, pad_id)
    assert _planned_shards(columns, plans, arrays, keeps, spec) == local
    assert left == feed.left.get("tokens", feed.left.get("tokens_dropped"))


@settings(max_examples=60, deadline=None)
@given(
    units=units_strategy,
    seed=st.integers(0, 1000),
    size_limit=st.integers(1, 200),
    dedup=st.booleans(),
)
def test_planned_raw_shards_equal_the_raw_packer(units, seed, size_limit, dedup):
    arrays = _raw_units(units, seed)
    columns = {"text": "str", "url": "str"}

    def feed(writer):
        packer = RawPacker(writer, 2, Deduper() if dedup else None)
        for unit in arrays:
            packer.add({k: v for k, v in unit.items() if dedup or k != "hashes"})

    local = _local_shards(columns, size_limit, feed)
    keeps = _keeps(arrays, dedup, "offsets0")
    sizes = []
    for a, keep in zip(arrays, keeps):
        encoded = np.diff(a["offsets0"]) + np.diff(a["offsets1"])
        sizes.append(sample_bytes(encoded if keep is None else encoded[keep], 2))
    plans = plan_raw_shards(sizes, size_limit)
    spec = ShardSpec(Area(""), columns, None, 0, None, None, None, None)
    assert _planned_shards(columns, plans, arrays, keeps, spec) == local


def test_the_engine_job_on_local_processes_writes_the_bytes_of_a_local_run(tmp_path, monkeypatch):
    """The whole three-phase job (files cut into byte ranges, one task per shard, a task
    failing once) on the local engine, against ``convert --workers 1``."""
    docs = sample_docs(300)
    inputs = [
        write_jsonl(tmp_path / "a.jsonl.gz", docs[:120], "gzip"),
        write_jsonl(tmp_path / "b.jsonl", docs[100:] + docs[:10]),
        tmp_path / "c.parquet",
        tmp_path / "d.txt",
    ]
    pq.write_table(pa.Table.from_pylist(docs[:40]), inputs[2], row_group_size=16)
    inputs[3].write_text(docs[50]["text"], encoding="utf-8")
    assert len(byte_ranges(find_inputs([str(inputs[1])])[0], 8000, False)) > 2
    for options in (
        {"tokenizer": str(TOKENIZER), "seq_len": 64, "dedup": True, "tail": "pad"},
        {"keep_fields": [], "dedup": True},
    ):
        common = dict(inputs=[str(p) for p in inputs], unit_size="8KB", size_limit="20KB")
        convert(ConvertOptions(out=str(tmp_path / "local"), workers=1, **common, **options))
        engine = LocalEngine(2)
        try:
            job = DistributedJob(
                ConvertOptions(out=str(tmp_path / "engine"), **common, **options), engine=engine
            )
            monkeypatch.setenv(FAIL_ONCE_ENV, "read-000001-001,shard-000001")
            job.run()
        finally:
            engine.close()
        assert engine.counts.retried == 2 and job.result.tasks_retried == 2
        local = dataset_files(tmp_path / "local")
        assert len(local) > 3 and dataset_files(tmp_path / "engine") == local
        shutil.rmtree(tmp_path / "local")
        shutil.rmtree(tmp_path / "engine")


def test_a_parquet_file_split_by_row_groups_writes_the_bytes_of_a_local_run(tmp_path):
    """A Parquet file of many 3-row groups, cut into 2-row units (so units span row groups
    and task boundaries), is read by several row-group tasks; only the last hashes the file,
    and the engine job writes the bytes of ``convert --workers 1``, raw and tokenized."""
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(sample_docs(150)), path, row_group_size=3)
    source = find_inputs([str(path)])[0]
    unit_bytes, rows = 6000, parquet_unit_rows(6000)
    parts = file_ranges(source, unit_bytes, False)
    starts = np.cumsum([0, *parquet_row_groups(str(path))])
    assert rows == 2 and len(parts) > 2
    assert any(starts[first] % rows for first, _ in parts)  # a unit spans two tasks' groups
    whole = FileReport(source.size)
    units = [
        (u.number, u.first_line, u.payload) for u in parquet_units(source, 0, unit_bytes, whole)
    ]
    joined, reports = [], []
    for part in parts:
        reports.append(FileReport(source.size))
        joined += [
            (u.number, u.first_line, u.payload)
            for u in parquet_units(source, 0, unit_bytes, reports[-1], part)
        ]
    assert joined == units and len(units) == 75
    assert [r.xxh3_64 for r in reports] == [""] * (len(parts) - 1) + [whole.xxh3_64]
    for options in ({"tokenizer": str(TOKENIZER), "seq_len": 64}, {"keep_fields": ["url"]}):
        common = dict(inputs=[str(path)], unit_size=unit_bytes, size_limit="20KB")
        convert(ConvertOptions(out=str(tmp_path / "local"), workers=1, **common, **options))
        engine = LocalEngine(2)
        try:
            job = DistributedJob(
                ConvertOptions(out=str(tmp_path / "engine"), **common, **options), engine=engine
            )
            job.run()
        finally:
            engine.close()
        assert job.part_names == [f"000000-{r:03d}" for r in range(len(parts))]
        local = dataset_files(tmp_path / "local")
        assert len(local) > 3 and dataset_files(tmp_path / "engine") == local
        shutil.rmtree(tmp_path / "local")
        shutil.rmtree(tmp_path / "engine")


def test_the_engine_job_stops_on_the_error_a_local_run_meets_first(tmp_path, monkeypatch):
    """The first file's error wins even when the second file's task fails first."""
    monkeypatch.setenv(STALL_ONCE_ENV, "read-000000:1")
    monkeypatch.setenv(FAULT_DIR_ENV, str(tmp_path / "faults"))
    docs = sample_docs(120)
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", docs[:80], "gzip").read_bytes()
    (tmp_path / "a-cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    lines = "".join(json.dumps(d) + "\n" for d in docs[80:]) + "{not json\n"
    (tmp_path / "b-bad.jsonl").write_text(lines, encoding="utf-8")
    inputs = [str(tmp_path / "a-cut.jsonl.gz"), str(tmp_path / "b-bad.jsonl")]
    messages = []
    for engine in (None, LocalEngine(2)):
        options = ConvertOptions(inputs=inputs, out=str(tmp_path / "out"), unit_size="8KB")
        job = DistributedJob(options, engine=engine) if engine else None
        with pytest.raises(ConvertError) as caught:
            job.run() if job else convert(replace(options, workers=1))
        messages.append(str(caught.value))
        if engine:
            engine.close()
    assert "a-cut.jsonl.gz: unreadable after line" in messages[0]
    assert messages[1] == messages[0]


@settings(max_examples=40, deadline=None)
@given(
    units=st.lists(st.lists(st.integers(0, 8), max_size=10), min_size=1, max_size=6),
    dropped=st.sets(st.integers(0, 5)),
    buckets=st.integers(1, 5),
    split=st.integers(1, 3),
)
def test_hash_bucket_dedup_keeps_what_the_deduper_keeps(units, dropped, buckets, split):
    """Bucket tasks mark as duplicates exactly the documents the one-pass Deduper drops,
    over the units that are packed (``dropped`` units are not), whatever the bucket count."""
    with tempfile.TemporaryDirectory() as folder:
        work = Area(folder)
        # Units of file 0 in ``split`` consecutive parts, as byte-range tasks write them.
        bounds = np.linspace(0, len(units), split + 1).astype(int)
        parts = []
        for p, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            keys = [
                (unit_code(0, n), np.frombuffer(b"".join(_key(k) for k in units[n]), np.uint8))
                for n in range(lo, hi)
            ]
            write_keys(work, f"p{p}", keys, buckets)
            parts.append(f"p{p}")
        dropped_codes = [unit_code(0, n) for n in dropped]
        marked = set()
        for b in range(buckets):
            found = dedup_bucket_task(b, parts, dropped_codes, work, Attempt(f"dedup-{b}"))
            marked |= set(zip(found["units"].tolist(), found["docs"].tolist()))
    deduper = Deduper()
    expected = set()
    for n, docs in enumerate(units):
        if n in dropped:
            continue
        hashes = np.frombuffer(b"".join(_key(k) for k in docs), np.uint8)
        keep = deduper.keep(hashes, len(docs))
        expected |= {(unit_code(0, n), i) for i, kept in enumerate(keep) if not kept}
    assert marked == expected


def test_merge_on_the_engine_writes_the_bytes_of_merge(tmp_path):
    """Parts of mixed shard sizes, merged by ``merge.merge`` and by engine tasks."""
    rng = np.random.default_rng(7)
    columns = {"text": "str", "tokens": "ndarray:uint16:16"}
    for p, (count, limit) in enumerate([(40, "2KB"), (1, "1KB"), (75, "5KB")]):
        with ShardWriter(tmp_path / "parts" / f"p{p}", columns, size_limit=limit) as writer:
            for _ in range(count):
                text = "x" * int(rng.integers(0, 300))
                writer.write({"text": text, "tokens": rng.integers(0, 9, 16, dtype=np.uint16)})
    merge([tmp_path / "parts"], tmp_path / "one", size_limit="3KB")
    engine = LocalEngine(2)
    try:
        merge_on_engine(
            [str(tmp_path / "parts")], str(tmp_path / "tasks"), "zstd", "3KB", False, engine
        )
    finally:
        engine.close()
    one = dataset_files(tmp_path / "one")
    assert len(one) > 4 and dataset_files(tmp_path / "tasks") == one


class _TamperingEngine(LocalEngine):
    """The local engine, except that a byte of shard 1 in OUT changes (same size) once every
    shard is written and before the driver's read-back checks run."""

    def __init__(self, out: Path):
        super().__init__(2)
        self.out = out

    def run(self, tasks):
        if tasks and tasks[0].name.startswith("check-"):
            (shard,) = self.out.glob("shard.000001.ssd*")
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0x01
            shard.write_bytes(bytes(data))
        return super().run(tasks)


def test_a_shard_changed_in_out_after_its_task_is_named_and_a_rerun_writes_it_again(tmp_path):
    """The driver reads every shard back (a task per shard) before the index: a shard whose
    bytes are not what its task wrote stops the job, naming it; the same command again
    rewrites that shard and gives the bytes of a local run."""
    docs = sample_docs(200)
    common = dict(
        inputs=[str(write_jsonl(tmp_path / "a.jsonl", docs))], unit_size="8KB", size_limit="20KB"
    )
    convert(ConvertOptions(out=str(tmp_path / "local"), workers=1, **common))
    out = tmp_path / "engine"
    engine = _TamperingEngine(out)
    try:
        with pytest.raises(ConvertError, match=r"shard shard\.000001\.ssd\.zst holds \d+ bytes"):
            DistributedJob(ConvertOptions(out=str(out), **common), engine=engine).run()
    finally:
        engine.close()
    assert not (out / "index.json").exists()
    engine = LocalEngine(2)
    try:
        DistributedJob(ConvertOptions(out=str(out), **common), engine=engine).run()
    finally:
        engine.close()
    assert dataset_files(out) == dataset_files(tmp_path / "local")


def test_the_engine_job_again_after_success_is_done_and_another_job_needs_overwrite(tmp_path):
    """As a local run: the same job on a finished OUT does nothing and leaves no work area;
    a different job there is refused unless ``overwrite``, which replaces the dataset."""
    docs = sample_docs(120)
    common = dict(
        inputs=[str(write_jsonl(tmp_path / "a.jsonl", docs))], unit_size="8KB", size_limit="20KB"
    )
    out = tmp_path / "engine"
    engine = LocalEngine(2)
    try:
        DistributedJob(ConvertOptions(out=str(out), **common), engine=engine).run()
        first = dataset_files(out)
        again = DistributedJob(ConvertOptions(out=str(out), **common), engine=engine)
        assert again.run().already_done
        assert dataset_files(out) == first and not (out / WORK_NAME).exists()
        other = ConvertOptions(out=str(out), min_chars=400, **common)
        with pytest.raises(ConvertError, match=r"already holds a dataset; pass --overwrite"):
            DistributedJob(other, engine=engine).run()
        DistributedJob(replace(other, overwrite=True), engine=engine).run()
    finally:
        engine.close()
    assert dataset_files(out) != first
