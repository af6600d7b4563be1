"""Hostile input, concurrent jobs, kills and unwritable outputs: convert, merge, the writer."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamshards import StreamingDataset
from streamshards.cli import main
from streamshards.convert.lock import LOCK_NAME
from streamshards.index import INDEX_NAME, load_index
from streamshards.writer import OutputError, ShardWriter

GATE_FILTER = """
import os, time

def keep(doc):
    open(os.environ["STARTED"], "a").close()
    while not os.path.exists(os.environ["GATE"]):
        time.sleep(0.01)
    return True
"""
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def docs(tag: str, count: int) -> list[dict]:
    """Distinct documents of a few hundred bytes."""
    return [
        {"text": f"{tag} {i} " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(40))}
        for i in range(count)
    ]


def jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in items).encode("utf-8")


def cli(*args, expect_ok: bool = True):
    """``streamshards ARGS`` in this process; an unexpected exception fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]


def start(*args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """The real command in a new process."""
    code = "from streamshards.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every file of a dataset, the index without its creation time."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != INDEX_NAME}
    index = json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))
    index["provenance"].pop("created")
    files[INDEX_NAME] = json.dumps(index, sort_keys=True).encode("utf-8")
    return files


def texts(out: Path) -> list[str]:
    dataset = StreamingDataset(local=out)
    return [dataset[i]["text"] for i in range(len(dataset))]


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture
def gated(tmp_path):
    """A corpus and a --filter that holds every worker until the test opens the gate."""
    (tmp_path / "gate_filter.py").write_text(GATE_FILTER)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(jsonl(docs("doc", 400)))
    env = {"STARTED": str(tmp_path / "started"), "GATE": str(tmp_path / "gate")}
    args = ["convert", corpus, "--filter", "gate_filter:keep", "--unit-size", "8KB", "--quiet"]
    return tmp_path, args, env


def solo(tmp_path: Path, args: list, env: dict) -> dict[str, bytes]:
    Path(env["GATE"]).touch()
    try:
        process = start(*args[:2], tmp_path / "solo", *args[2:], cwd=tmp_path, env=env)
        assert process.wait(60) == 0, process.communicate()
    finally:
        Path(env["GATE"]).unlink()
        Path(env["STARTED"]).unlink(missing_ok=True)
    return dataset_files(tmp_path / "solo")


def test_a_second_convert_into_a_busy_out_is_refused_and_the_first_equals_a_solo_run(gated):
    tmp_path, args, env = gated
    expected = solo(tmp_path, args, env)
    out = tmp_path / "out"
    first = start(*args[:2], out, *args[2:], "--workers", "2", cwd=tmp_path, env=env)
    try:
        wait_for(Path(env["STARTED"]), first)
        for extra in ([], ["--min-chars", "2000", "--overwrite", "--workers", "1"]):
            began = time.monotonic()
            second = start(*args[:2], out, *args[2:], *extra, cwd=tmp_path, env=env)
            _, err = second.communicate(timeout=60)
            assert second.returncode != 0
            assert time.monotonic() - began < 30
            assert len(err.strip().splitlines()) == 1 and "in use by another convert" in err
            assert f"pid {first.pid}" in err
        Path(env["GATE"]).touch()
        assert first.wait(60) == 0, first.communicate()
    finally:
        Path(env["GATE"]).touch()
        first.kill()
    assert dataset_files(out) == expected
    assert not (out / LOCK_NAME).exists()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_main_process_alone_leaves_no_worker_and_a_rerun_resumes(gated):
    tmp_path, args, env = gated
    expected = solo(tmp_path, args, env)
    out = tmp_path / "out"
    job = start(*args[:2], out, *args[2:], "--workers", "2", cwd=tmp_path, env=env)
    workers = []
    try:
        wait_for(Path(env["STARTED"]), job)
        workers = children(job.pid)
        assert len(workers) == 2
        os.kill(job.pid, signal.SIGKILL)  # the main process only, not its group
        job.wait(10)
        deadline = time.monotonic() + 5
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(running, workers)), "a worker outlived its job"
    finally:
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    Path(env["GATE"]).touch()
    rerun = start(*args[:2], out, *args[2:], "--workers", "2", cwd=tmp_path, env=env)
    assert rerun.wait(60) == 0, rerun.communicate()
    assert dataset_files(out) == expected


GOOD = {"text": "good one", "meta": {"a": 1}, "url": "u"}
DEEP = "[" * 100_000 + "]" * 100_000
BAD_RECORDS = {
    "surrogate-in-text": ('{"text": "bad \\ud800", "meta": {}, "url": "u"}', "lone_surrogate"),
    "surrogate-in-kept-str": ('{"text": "t", "meta": {}, "url": "\\udfff"}', "lone_surrogate"),
    "surrogate-in-kept-json": ('{"text": "t", "meta": ["\\ud800"], "url": "u"}', "lone_surrogate"),
    "nan-in-kept-json": ('{"text": "t", "meta": {"x": NaN}, "url": "u"}', "nan_or_infinity"),
    "infinity-in-kept-json": ('{"text": "t", "meta": -Infinity, "url": "u"}', "nan_or_infinity"),
    "deep-nesting": ('{"text": "t", "meta": ' + DEEP + ', "url": "u"}', "nested_too_deep"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_hostile_record_fails_in_one_line_or_is_skipped_and_counted(tmp_path, case):
    line, reason = BAD_RECORDS[case]
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([GOOD] * 2) + line.encode() + b"\n" + jsonl([GOOD]))
    keep = ["--keep-fields", "url,meta:json", "--workers", "1"]
    failed = cli("convert", path, tmp_path / "out", *keep, expect_ok=False)
    assert_one_line_error(failed, f"{path}:3")
    cli("convert", path, tmp_path / "out", *keep, "--on-error", "skip", "--quiet")
    assert texts(tmp_path / "out") == ["good one"] * 3
    documents = load_index(tmp_path / "out").provenance["documents"]
    assert documents["bad_records_skipped"] == {reason: 1}


def test_a_lone_surrogate_is_skipped_before_the_tokenizer(tmp_path):
    tokenizer = Path(__file__).resolve().parents[2] / "streamshards" / "data" / "tokenizer.json"
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(docs("d", 50)) + b'{"text": "\\ud800"}\n')
    args = ["--tokenizer", tokenizer, "--seq-len", "64", "--on-error", "skip", "--quiet"]
    cli("convert", path, tmp_path / "out", *args)
    documents = load_index(tmp_path / "out").provenance["documents"]
    assert documents["bad_records_skipped"] == {"lone_surrogate": 1}


def test_a_truncated_middle_gzip_member_keeps_nothing_decoded_past_the_damage(tmp_path):
    members = [docs("one", 150), docs("two", 150), docs("three", 150)]
    packed = [gzip.compress(jsonl(m), mtime=0) for m in members]
    genuine = [d["text"] for d in members[0] + members[1]]
    step = max(1, len(packed[1]) // 40)
    for number, cut in enumerate(range(20, len(packed[1]) - 20, step)):
        path = tmp_path / f"cut{number}.jsonl.gz"
        path.write_bytes(packed[0] + packed[1][:cut] + packed[2])
        out = tmp_path / f"out{number}"
        args = ["--unit-size", "4KB", "--workers", "1", "--quiet"]
        failed = cli("convert", path, out, *args, expect_ok=False)
        assert_one_line_error(failed, str(path), "unreadable after line")
        cli("convert", path, out, *args, "--on-error", "skip")
        kept = texts(out)
        assert kept == genuine[: len(kept)], f"cut at {cut}: text from past the damage"
        provenance = load_index(out).provenance
        assert provenance["documents"]["bad_records_skipped"] == {"unreadable_file": 1}
        (entry,) = provenance["inputs"]
        assert f"unreadable after line {len(kept)}" in entry["read_error"]


def test_a_gzip_file_cut_at_its_end_keeps_the_lines_before_the_cut(tmp_path):
    items = docs("one", 300)
    data = gzip.compress(jsonl(items), mtime=0)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    cli("convert", path, tmp_path / "out", "--on-error", "skip", "--unit-size", "4KB", "--quiet")
    kept = texts(tmp_path / "out")
    assert 0 < len(kept) < len(items) and kept == [d["text"] for d in items[: len(kept)]]


def part(folder: Path, count: int) -> Path:
    with ShardWriter(folder, {"text": "str"}, None, "8KB") as writer:
        for item in docs(folder.name, count):
            writer.write(item)
    return folder


def test_an_out_that_is_a_file_gives_one_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(jsonl(docs("d", 5)))
    target = tmp_path / "taken"
    target.write_text("a file")
    assert_one_line_error(cli("convert", corpus, target, expect_ok=False), str(target), "file")
    assert_one_line_error(
        cli("convert", corpus, target / "sub", expect_ok=False), str(target / "sub")
    )
    parts = part(tmp_path / "p0", 5)
    merged = cli("merge", parts, "--out", target, expect_ok=False)
    assert_one_line_error(merged, str(target), "file")
    with pytest.raises(OutputError, match="is a file"):
        ShardWriter(target, {"text": "str"})
    assert target.read_text() == "a file"


def mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def mounted(tmp_path):
    mounts = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        mount_tmpfs(folder, options)
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_out_gives_one_line(tmp_path, mounted):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(jsonl(docs("d", 5)))
    parts = part(tmp_path / "p0", 5)
    read_only = mounted("ro", "ro,size=1m")
    for out in (read_only, read_only / "new"):
        converted = cli("convert", corpus, out, "--quiet", expect_ok=False)
        assert_one_line_error(converted, str(out))
        assert "read-only" in converted.output or "not writable" in converted.output
        assert_one_line_error(cli("merge", parts, "--out", out, expect_ok=False), str(out))
        with pytest.raises(OutputError, match=str(out)):
            ShardWriter(out, {"text": "str"})


def test_a_full_disk_gives_one_line_and_a_rerun_with_space_resumes_to_the_same_bytes(
    tmp_path, mounted
):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(jsonl(docs("d", 3000)))  # about 1 MB
    args = ["--compression", "none", "--unit-size", "64KB", "--size-limit", "200KB"]
    cli("convert", corpus, tmp_path / "solo", *args, "--quiet")
    parts = [part(tmp_path / "parts" / f"p{i}", 1500) for i in range(2)]
    cli("merge", *parts, "--out", tmp_path / "merged", "--compression", "none")
    disk = mounted("disk", "size=1200k")
    out = disk / "out"
    full = cli("convert", corpus, out, *args, "--quiet", expect_ok=False)
    assert_one_line_error(full, str(out), "no space left")
    assert not (out / INDEX_NAME).exists()
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    resumed = cli("convert", corpus, out, *args)
    assert "0 reused" not in resumed.output
    assert dataset_files(out) == dataset_files(tmp_path / "solo")

    small = mounted("small", "size=300k")
    merged = small / "merged"
    full = cli("merge", *parts, "--out", merged, "--compression", "none", expect_ok=False)
    assert_one_line_error(full, str(merged), "no space left")
    subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
    cli("merge", *parts, "--out", merged, "--compression", "none")
    assert dataset_files(merged) == dataset_files(tmp_path / "merged")
