"""scripts/gpu-smoke.sh, rehearsed on the CPU with a prebuilt toolchain, so the script a GPU machine
runs once is not found broken there: options, the demo with --eval, the timings it prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-smoke.sh"


def smoke(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UDQUANT_VENV": sys.prefix}
    env.pop("UDQUANT_LLAMA_CPP", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_rehearsal_runs_the_demo_with_eval_and_prints_timings(toolchain, tmp_path):
    out = tmp_path / "out"
    done = smoke("--toolchain", toolchain.root, "--cpu", "--out-dir", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == str(out.resolve())
    assert f"toolchain: {toolchain.root} (0 s, prebuilt)" in done.stderr
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
