"""Killed at any point and run again, convert finishes the job and equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from convert_helpers import (
    SAMPLE,
    TOKENIZER,
    dataset_files,
    run_convert,
    sample_docs,
    write_jsonl,
)

from streamshards.convert.spill import WORK_NAME

ARGS = [
    "--tokenizer",
    str(TOKENIZER),
    "--seq-len",
    "256",
    "--unit-size",
    "40KB",
    "--size-limit",
    "100KB",
    "--workers",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 2 MB of the sample corpus in about 50 units."""
    return write_jsonl(
        tmp_path_factory.mktemp("corpus") / "docs.jsonl.gz", sample_docs(1000), "gzip"
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("resume") / "whole"
    run_convert(corpus, out, *ARGS)
    return dataset_files(out)


def start_cli(corpus, out) -> int:
    """The real command in a new process group; returns its pid."""
    code = "from streamshards.cli import main; main()"
    command = [sys.executable, "-c", code, "convert", str(corpus), str(out), *ARGS]
    return subprocess.Popen(command, start_new_session=True).pid


def start_forked(corpus, out) -> int:
    """The command in a forked child (no interpreter start-up), in a new process group."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        code = 1
        try:
            run_convert(corpus, out, *ARGS)
            code = 0
        finally:
            os._exit(code)
    return pid


def kill_after_units(pid: int, out, units: int) -> None:
    """SIGKILL the whole process group once ``units`` units are finished."""
    folder = out / WORK_NAME / "units"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        if folder.is_dir() and sum(n.endswith(".npz") for n in os.listdir(folder)) >= units:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.005)
    pytest.fail("convert finished before it could be killed")


def test_sigkill_then_rerun_equals_an_uninterrupted_run_without_redoing_units(
    tmp_path, corpus, uninterrupted
):
    out = tmp_path / "out"
    kill_after_units(start_cli(corpus, out), out, 12)
    assert not (out / "index.json").exists()
    result = run_convert(corpus, out, *[a for a in ARGS if a != "--quiet"])
    reused = int(result.output.split("units")[1].split("(")[1].split()[0])
    assert reused >= 12
    assert dataset_files(out) == uninterrupted
    assert not (out / WORK_NAME).exists()


def test_repeated_kills_and_a_rerun_after_success_change_nothing(tmp_path, corpus, uninterrupted):
    out = tmp_path / "out"
    for units in (1, 20, 40):
        kill_after_units(start_forked(corpus, out), out, units)
    run_convert(corpus, out, *ARGS)
    assert dataset_files(out) == uninterrupted
    again = run_convert(corpus, out, *[a for a in ARGS if a != "--quiet"])
    assert "nothing to do" in again.output
    assert dataset_files(out) == uninterrupted


def test_a_different_job_in_the_same_folder_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    run_convert(SAMPLE, out, "--workers", "1")
    first = dataset_files(out)
    refused = run_convert(SAMPLE, out, "--min-chars", "500", expect_ok=False)
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    run_convert(SAMPLE, out, "--min-chars", "500", "--overwrite", "--size-limit", "100KB")
    assert len(dataset_files(out)) > len(first)
    run_convert(SAMPLE, out, "--overwrite", "--workers", "2")
    assert dataset_files(out) == first
