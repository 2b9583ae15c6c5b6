"""scripts/build-toolchain.sh's reuse of a finished build: only when the tag and flags match."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-toolchain.sh"


def build(*args: str) -> subprocess.CompletedProcess[str]:
    # Only the reuse check runs: any build would take minutes and fail these tests' timeout.
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def prefix(toolchain, tmp_path) -> Path:
    folder = tmp_path / "llama.cpp"
    folder.mkdir()
    shutil.copy(toolchain.root / "toolchain.json", folder)
    return folder


def test_a_prefix_with_the_same_build_is_reused_and_a_trailing_slash_is_harmless(prefix):
    done = build("--prefix", f"{prefix}/")
    assert done.returncode == 0, done.stderr
    assert "b11434 (cpu) already built" in done.stderr
    assert done.stdout.strip() == str(prefix)


def test_a_prefix_with_another_build_is_refused_not_reused(prefix):
    done = build("--cuda", "--prefix", str(prefix))
    assert done.returncode == 2
    assert f"{prefix} holds a llama.cpp build made with other settings" in done.stderr
    manifest = json.loads((prefix / "toolchain.json").read_text())
    manifest["cmake_flags"].append("-DGGML_AVX512=ON")
    (prefix / "toolchain.json").write_text(json.dumps(manifest))
    done = build("--prefix", str(prefix))
    assert done.returncode == 2 and "other settings" in done.stderr
    # A build of the same flags without one of the tools (an earlier udquant's) is another build too.
    manifest["cmake_flags"].remove("-DGGML_AVX512=ON")
    manifest["tools"].remove("llama-mtmd-cli")
    (prefix / "toolchain.json").write_text(json.dumps(manifest))
    done = build("--prefix", str(prefix))
    assert done.returncode == 2 and "other settings" in done.stderr


def test_the_cpu_build_is_portable(toolchain):
    """No -march=native: no AVX-512 or AMX instructions, which the build machine may have and the next may not."""
    manifest = json.loads((toolchain.root / "toolchain.json").read_text())
    assert "-DGGML_NATIVE=OFF" in manifest["cmake_flags"]
    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("the instruction check reads x86-64 code with objdump (binutils)")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(toolchain.root / "bin" / "llama-perplexity")],
                             capture_output=True, text=True, timeout=300, check=True).stdout
    assert "%ymm" in listing  # the x86-64-v3 baseline: AVX2
    assert "%zmm" not in listing and "%tmm" not in listing
