"""scripts/gpu-smoke.sh, rehearsed on the CPU with a prebuilt toolchain, so the script a GPU machine
runs once is not found broken there: options, the demo with --eval, the timings it prints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-smoke.sh"


def smoke(*args: str | Path, cwd: Path, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UDQUANT_VENV": sys.prefix}
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    env.pop("UDQUANT_LLAMA_CPP", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_rehearsal_runs_the_demo_with_eval_and_prints_timings(toolchain, tmp_path):
    out = tmp_path / "out"
    done = smoke("--toolchain", toolchain.root, "--cpu", "--out-dir", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == str(out.resolve())
    assert re.search(rf"toolchain: {re.escape(str(toolchain.root))} \([01] s, prebuilt\)", done.stderr)
    for stage in ("convert", "imatrix", "quantize UD-Q5_K_XL", "eval"):
        assert f"gpu-smoke: stage {stage}: " in done.stderr
    assert "gpu-smoke: UD-Q5_K_XL: 6.19 BPW, mean KLD " in done.stderr
    assert "gpu-smoke: Q5_K_M (standard): " in done.stderr


def test_help_is_the_whole_header(tmp_path):
    done = smoke("--help", cwd=tmp_path)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith("# GPU smoke test:")
    assert lines[-1] == "# compiler. The last line printed is the output folder."


def test_refusals_are_clear(toolchain, tmp_path):
    missing = smoke("--toolchain", tmp_path / "nothing", cwd=tmp_path)
    assert missing.returncode == 2 and "no toolchain.json in" in missing.stderr
    neither = smoke("--cpu", cwd=tmp_path)
    assert neither.returncode == 2 and "this script never downloads" in neither.stderr
    if shutil.which("nvidia-smi") is None:
        no_gpu = smoke("--toolchain", toolchain.root, cwd=tmp_path)
        assert no_gpu.returncode == 2 and "nvidia-smi not found" in no_gpu.stderr


# What nvidia-smi prints for the script's two questions on an H200.
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *name,driver_version*) echo "NVIDIA H200, 580.95.05, 143771 MiB, 9.0" ;;
  *compute_cap*) echo "9.0" ;;
  *) exit 9 ;;
esac
"""


def test_on_a_gpu_machine_a_cpu_build_is_refused_after_the_gpu_is_named(toolchain, tmp_path):
    """The GPU branch, up to the demo: the GPU named from nvidia-smi, and a toolchain that would run on the
    CPU refused, not run for minutes and reported as a GPU result."""
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake_bin / "nvidia-smi").chmod(0o755)
    done = smoke("--toolchain", toolchain.root, "--out-dir", tmp_path / "out", cwd=tmp_path, path=fake_bin)
    assert done.returncode == 2, done.stderr
    assert "gpu-smoke: GPU: NVIDIA H200, 580.95.05, 143771 MiB, 9.0" in done.stderr
    assert f"{toolchain.root} is a cpu build: the smoke test needs a CUDA one" in done.stderr
    assert not (tmp_path / "out").exists()
