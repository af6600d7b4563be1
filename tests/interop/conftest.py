"""A writable copy of a fixture for corruption cases; the helpers module on the path."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from interop_helpers import FIXTURES  # noqa: E402


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
