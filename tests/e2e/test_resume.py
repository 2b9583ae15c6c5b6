"""A kill (SIGKILL: no cleanup runs) at any stage, then the same command again, completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, FAST_IMATRIX, run_cli
from udquant.output import sha256_file

pytestmark = pytest.mark.e2e


def run_until(args: list[str], marker: str, cwd: Path) -> str:
    """Start the job and SIGKILL it as soon as its log says marker; return what it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(BIN / "udquant-job"), *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and the tool it runs
            break
    proc.wait(timeout=60)
    return "".join(seen)


@pytest.mark.parametrize("stage", ["convert", "imatrix", "quantize UD-Q5_K_XL", "output"])
def test_kill_then_rerun_completes(stage, llama, toolchain, tmp_path):
    args = [str(llama), "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), *FAST_IMATRIX]
    printed = run_until(args, f"{stage}: started", tmp_path)
    assert f"{stage}: started" in printed, printed
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    result = json.loads((out / "udquant-result.json").read_text())
    level = result["levels"][0]
    assert level["sha256"] == sha256_file(out / level["file"])
    leftovers = [p for p in tmp_path.rglob("*.partial-*")]
    assert leftovers == [], leftovers
    if stage != "convert":  # what finished before the kill is reused
        assert result["timings"]["convert"]["cached"] is True


def test_interrupt_exits_130(llama, toolchain, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [str(llama), "--work-dir", str(tmp_path / "work"), *FAST_IMATRIX]
    proc = subprocess.Popen([str(BIN / "udquant-job"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "convert: started" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "interrupted; rerun the same command" in rest
