"""scripts/check-toolchain.sh on the real build, and on copies of it broken the two ways a build
was seen broken on a GPU machine: a library with its own libstdc++, a tool that aborts at start."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check-toolchain.sh"


def check(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture
def toolchain_copy(toolchain, tmp_path) -> Path:
    copy = tmp_path / "toolchain"
    shutil.copytree(toolchain.root, copy, symlinks=True)
    return copy


def test_the_real_build_passes(toolchain):
    done = check(toolchain.root)
    assert done.returncode == 0, done.stderr
    assert "4 tools start, no own copy of libstdc++" in done.stderr


def test_a_library_with_its_own_libstdcxx_is_refused(toolchain_copy, tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to link a library the broken way")
    source = tmp_path / "lib.cpp"
    source.write_text('#include <iostream>\n#include <string>\n'
                      'extern "C" int say(const char* s) { std::string t(s); std::cout << t; return (int)t.size(); }\n')
    subprocess.run(["g++", "-shared", "-fPIC", "-static-libstdc++", str(source), "-o",
                    str(toolchain_copy / "bin" / "libggml-cuda.so.0.26.0")], check=True)
    done = check(toolchain_copy)
    assert done.returncode == 2
    assert "libstdc++ is linked statically into libggml-cuda.so.0.26.0 " in done.stderr


def test_a_tool_that_aborts_at_start_is_refused(toolchain_copy):
    quantize = toolchain_copy / "bin" / "llama-quantize"
    quantize.unlink()
    quantize.write_text("#!/bin/sh\necho 'free(): invalid pointer' >&2\nkill -ABRT $$\n")
    quantize.chmod(0o755)
    done = check(toolchain_copy)
    assert done.returncode == 2
    assert "llama-quantize does not start (exit 134): free(): invalid pointer" in done.stderr


def test_a_missing_tool_is_refused(toolchain_copy):
    (toolchain_copy / "bin" / "llama-perplexity").unlink()
    done = check(toolchain_copy)
    assert done.returncode == 2 and "llama-perplexity missing from" in done.stderr
