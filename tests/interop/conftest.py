"""A writable copy of a fixture for corruption cases; the helpers module on the path."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from interop_helpers import FIXTURES  # noqa: E402


def _remote_fixtures():
    """tests/remote's conftest (its real local S3 server), loaded under its own name."""
    path = Path(__file__).resolve().parents[1] / "remote" / "conftest.py"
    spec = importlib.util.spec_from_file_location("remote_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_remote = _remote_fixtures()
s3_server = _remote.s3_server
s3_bucket = _remote.s3_bucket


@pytest.fixture
def fixture_copy(tmp_path):
    """A writable copy of a fixture's data folder, for corruption cases."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(FIXTURES / name / "data", target)
        for path in target.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        return target

    return copy
