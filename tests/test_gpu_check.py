r"""scripts/gpu-check.sh, rehearsed on the CPU as it runs on the GPU machine: zuko and the
notebook and docs packages hidden, zuko installed from a wheel, the tests, the float64 device
check and the reduced sweep, every file in one folder."""

import json
import os
import re
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

import bayesflow

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("timeout") is None, reason="no timeout command (coreutils)")
def test_gpu_check_rehearsal(tmp_path):
    env = {
        **os.environ,
        "GPU_CHECK_CPU": "1",
        "GPU_CHECK_PYTHON": sys.executable,  # this interpreter, with or without a .venv
        "OUT": str(tmp_path),
        "GPU_CHECK_TESTS": "tests/test_notebooks.py tests/test_schedules.py",
        "GPU_CHECK_SWEEP_OPTIONS": "--models mlp --modes forward",
    }
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    files = {p.name for p in tmp_path.iterdir()}
    assert files == {
        f"cpu-rehearsal{suffix}"
        for suffix in ("-env.txt", "-tests.txt", ".txt", ".json", ".csv", ".md")
    }

    env_log = (tmp_path / "cpu-rehearsal-env.txt").read_text()
    assert "zuko from zuko-" in env_log and "/site/zuko/__init__.py" in env_log  # the wheel
    assert f"bayesflow {bayesflow.__version__} from {ROOT}/bayesflow/" in env_log
    # The CPU against itself: the same numbers up to rounding. Not always bit for bit: the
    # first call runs all samples at once (and measures their footprint), a later one may
    # run them one by one where a sample overflows a core's cache (a CNN at 512 KiB).
    errors = re.findall(r"float64 cpu against cpu, .*: max relative error (\S+)", env_log)
    assert len(errors) == 4 and all(float(e) <= 1e-14 for e in errors), errors

    tests = (tmp_path / "cpu-rehearsal-tests.txt").read_text()
    assert "nbformat is not installed (the test extra)" in tests  # skipped, and says why
    assert " passed" in tests and "failed" not in tests

    records = json.loads((tmp_path / "cpu-rehearsal.json").read_text())
    cells = {(r["method"], r["samples"]) for r in records}
    assert {r["status"] for r in records} <= {"ok", "n/a"}
    assert ("vmap", 4) in cells and ("loop", 2) in cells
    assert ("loop", 4) not in cells and ("zuko-loop", 4) not in cells  # loops up to K = 2
    assert {r["method"] for r in records} == {
        "deterministic", "zuko-loop", "loop", "vmap", "bmm", "limit", "torch-func"
    }  # fmt: skip
