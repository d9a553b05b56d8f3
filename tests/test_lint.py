"""The code base passes its linter and type checker, configured in pyproject.toml (what CI enforces)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO


def _tool(name: str) -> str:
    return str(REPO / ".venv" / "bin" / name) if (REPO / ".venv" / "bin" / name).exists() else name


def test_ruff_finds_nothing():
    done = subprocess.run([_tool("ruff"), "check", "lejepa", "sweeps", "analysis", "benchmarks", "notebooks", "tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_mypy_finds_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Success" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
