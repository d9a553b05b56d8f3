"""benchmarks/gpu_check.py's reduced CPU version runs end to end (so the GPU check cannot rot
between the rare GPU sessions), and its figures are well-formed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_reduced_gpu_check_runs_every_section_on_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    page = (tmp_path / "gpu_check.md").read_text()
    for section in ("device", "sigreg", "bf16", "tests", "packing", "trainer"):
        assert f"## {section}" in page
    assert "all sections ran" in page
    # SIGReg: ours beside the direct formula, same value (relative difference printed last)
    rows = [line for line in page.splitlines() if line.startswith("| fp32 |")]
    assert len(rows) == 4 and all(float(r.split("|")[10]) < 1e-5 for r in rows)
    ratio = re.search(r"\| test_resnet \| 16 \| 64 \| eager \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", page)
    assert ratio and 0.5 < float(ratio.group(1)) < 2.0
    assert re.search(r"2 trials .* speed-up [\d.]+×", page)


def test_unknown_section_is_one_error_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--only", "sigreg,warp", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: unknown section(s) warp")
    assert not (tmp_path / "gpu_check.md").exists()
