"""The repository's own checks are wired as CONTRIBUTING says: `make lint` runs ruff (lint and
format) and mypy before the suite, and the pre-commit hooks run the same tools from .venv."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from helpers import LONGEST_FIRST, REPO

VENV_BIN = REPO / ".venv" / "bin"


def _files() -> list[str]:
    """The working tree's files as git sees them (tracked and untracked, ignored ones left out)."""
    done = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True)
    return [f for f in done.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def test_make_lint_runs_ruff_check_ruff_format_and_mypy_before_the_suite():
    plan = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = [line for line in plan.splitlines() if line.startswith(".venv/bin/")]
    tools = [line.split()[0].removeprefix(".venv/bin/") + (" " + line.split()[1] if "ruff" in line else "") for line in lines]
    assert tools[-4:] == ["ruff check", "ruff format", "mypy", "python"], plan
    assert "--check" in lines[-3] and "-m pytest" in lines[-1]


def test_pre_commit_hooks_are_the_lint_tools():
    hooks = {
        h["id"]: h for repo in yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())["repos"] for h in repo["hooks"]
    }
    assert set(hooks) == {"ruff-check", "ruff-format", "mypy"}
    assert all(h["entry"].startswith(".venv/bin/") and h["language"] == "system" for h in hooks.values())


@pytest.mark.skipif(not (VENV_BIN / "pre-commit").exists(), reason="needs make install's .venv")
def test_pre_commit_ruff_hooks_pass_on_a_copy_of_the_tree(tmp_path):
    """The hooks run for real (ruff's; mypy is make lint's) on a git copy of the working tree:
    a tree that is not lint-clean or not formatted fails here, and the tree itself is not touched."""
    copy = tmp_path / "tree"
    for name in _files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    (copy / ".venv").symlink_to(REPO / ".venv")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"), "SKIP": "mypy"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=copy, check=True, env=env)
    done = subprocess.run(
        [str(VENV_BIN / "pre-commit"), "run", "--all-files"], cwd=copy, capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "ruff check" in done.stdout and "ruff format" in done.stdout


def test_the_longest_first_queue_names_test_files_that_exist():
    """LONGEST_FIRST (conftest sorts by it) queues files by name: a renamed or removed file would silently lose its place."""
    missing = [name for name in LONGEST_FIRST if not (REPO / "tests" / name).is_file()]
    assert not missing, f"LONGEST_FIRST names files that are not in tests/: {missing}"
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
