"""Trainer tests: real torchrun processes with gloo on CPU; helpers in trainer_helpers.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from trainer_helpers import train, write_token_data  # noqa: E402

# The S3 server fixtures of tests/remote (s3_server, s3_bucket), shared rather than copied.
_spec = importlib.util.spec_from_file_location(
    "remote_conftest", Path(__file__).parents[1] / "remote" / "conftest.py"
)
_remote = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_remote)
s3_server = _remote.s3_server
s3_bucket = _remote.s3_bucket


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("tokens") / "data")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, token_data) -> Path:
    """An uninterrupted 2-rank run of 10 steps: the losses every other run is held to."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, output = train(token_data, run_dir)
    assert code == 0, output
    return run_dir
