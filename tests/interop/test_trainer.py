"""The trainer runs on an LLM Foundry MDS dataset as it is, local or on S3, and resumes.

Real ``python -m trainer.pretrain`` processes (one plain process each, tiny model) on the
``mds_tokens_int32`` fixture written by mosaicml-streaming: rows of 129 int32 token ids, no
tokenizer recorded, so the runs set ``model.seq_len=128`` and ``model.vocab_size``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from interop_helpers import FIXTURES
from test_remote import publish

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_helpers import events, losses, train  # noqa: E402

from trainer.metrics import read_metrics  # noqa: E402

NAME = "mds_tokens_int32"
DATA = FIXTURES / NAME / "data"
# The fixture's rows are 129 ids below 4096; an MDS index records no tokenizer.
MODEL = ["model.seq_len=128", "model.vocab_size=4096", "save_interval=3", "optim.decay_steps=6"]


def run(data: Path, run_dir: Path, steps: int, *overrides: str) -> None:
    """One plain trainer process up to ``steps`` steps; fails with its output."""
    code, output = train(data, run_dir, *MODEL, f"max_steps={steps}", *overrides, nproc=0)
    assert code == 0, output


def check_resumed(run_dir: Path) -> None:
    """Six finite-loss steps, the second launch resumed at step 3 and went on from there."""
    (resume,) = events(run_dir, "resume")
    assert resume["step"] == 3, resume
    steps, _ = read_metrics(run_dir)
    assert list(steps) == list(range(1, 7))
    assert all(math.isfinite(record["loss"]) for record in steps.values())
    # The loader state came back: the global batches go on from sample 24, not from 0.
    assert [steps[s]["samples_seen"] for s in steps] == [8 * s for s in steps]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run on the local fixture: the losses resumed runs must give."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(DATA, run_dir, 6)
    assert list(losses(run_dir)) == list(range(1, 7))
    return run_dir


def test_trainer_on_a_local_mds_dataset_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    run(DATA, run_dir, 3)
    run(DATA, run_dir, 6)
    check_resumed(run_dir)
    assert losses(run_dir) == losses(reference)


def test_trainer_on_an_mds_dataset_on_s3_resumes_exactly(s3_bucket, tmp_path, reference):
    """``data.remote=s3://…`` with ``data.local`` as the node cache, no conversion."""
    url = publish(NAME, s3_bucket)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    run(cache, run_dir, 3, f"data.remote={url}")
    run(cache, run_dir, 6, f"data.remote={url}")
    check_resumed(run_dir)
    # Same samples in the same order as the local folder: the same losses.
    assert losses(run_dir) == losses(reference)
    assert sorted(p.name for p in cache.rglob("*.mds")) == sorted(
        p.name for p in DATA.glob("*.mds")
    )
