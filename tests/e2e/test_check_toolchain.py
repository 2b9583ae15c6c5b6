"""scripts/check-toolchain.sh on the real build, on copies of it broken the two ways a build was
seen broken on a GPU machine (a library with its own libstdc++, a tool that aborts at start), and on
a CUDA-shaped build where no driver is; scripts/check-compiler.sh, which catches the first before a
build starts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from udquant.toolchain import TOOLS

pytestmark = pytest.mark.e2e

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SCRIPT = SCRIPTS / "check-toolchain.sh"
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("g++") is None,
                               reason="needs gcc and g++ to build the probes")


def check(folder: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=300,
                          check=False, env=env)


@pytest.fixture
def toolchain_copy(toolchain, tmp_path) -> Path:
    copy = tmp_path / "toolchain"
    shutil.copytree(toolchain.root, copy, symlinks=True)
    return copy


def test_the_real_build_passes(toolchain):
    done = check(toolchain.root)
    assert done.returncode == 0, done.stderr
    assert "5 tools start, no own copy of libstdc++" in done.stderr


@needs_gcc
def test_a_library_with_its_own_libstdcxx_is_refused(toolchain_copy, tmp_path):
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


def _cuda_shaped_build(tmp_path: Path) -> tuple[Path, Path]:
    """A toolkit with only the libcuda link stub, and the tools, each loading a libggml-cuda.so that
    needs libcuda.so.1: what a CUDA build looks like on a machine without the NVIDIA driver."""
    cuda_root = tmp_path / "cuda"
    stubs = cuda_root / "lib64" / "stubs"
    stubs.mkdir(parents=True)
    folder = tmp_path / "toolchain"
    (folder / "bin").mkdir(parents=True)
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "cuda.c").write_text("int cuInit(unsigned flags) { return (int)flags + 100; }\n")
    (sources / "ggml.c").write_text("int cuInit(unsigned flags);\n"
                                    "int ggml_backend_cuda_init(void) { return cuInit(0); }\n")
    (sources / "tool.c").write_text('#include <stdio.h>\nint ggml_backend_cuda_init(void);\n'
                                    'int main(void) { printf("version: 0 (fake)\\n"); '
                                    "return ggml_backend_cuda_init() == 100 ? 0 : 1; }\n")

    def gcc(*args: str) -> None:
        subprocess.run(["gcc", *args], check=True)

    gcc("-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", str(sources / "cuda.c"), "-o", str(stubs / "libcuda.so"))
    gcc("-shared", "-fPIC", str(sources / "ggml.c"), f"-L{stubs}", "-lcuda", "-o",
        str(folder / "bin" / "libggml-cuda.so"))
    for tool in TOOLS:
        gcc(str(sources / "tool.c"), f"-L{folder / 'bin'}", "-lggml-cuda", "-Wl,-rpath,$ORIGIN",
            "-Wl,--allow-shlib-undefined", "-o", str(folder / "bin" / tool))
    return cuda_root, folder


@needs_gcc
def test_a_cuda_build_without_a_driver_starts_on_the_toolkits_stub(tmp_path):
    from udquant.toolchain import nvidia_driver_present

    if nvidia_driver_present():
        pytest.skip("the NVIDIA driver is here: the stub is not needed")
    cuda_root, folder = _cuda_shaped_build(tmp_path)
    env = {key: value for key, value in os.environ.items() if key not in {"LD_LIBRARY_PATH", "CUDA_PATH"}}
    env["CUDA_HOME"] = str(cuda_root)
    alone = subprocess.run([str(folder / "bin" / "llama-quantize")], capture_output=True, text=True, check=False,
                           env=env)
    assert alone.returncode == 127 and "libcuda.so.1" in alone.stderr  # what the stub is for

    done = check(folder, env)
    assert done.returncode == 0, done.stderr
    assert "5 tools start" in done.stderr

    (cuda_root / "lib64" / "stubs" / "libcuda.so").unlink()
    done = check(folder, env)
    assert done.returncode == 2
    assert f"no NVIDIA driver here and no CUDA link stub at {cuda_root}/lib64/stubs/libcuda.so" in done.stderr


def check_compiler(*compilers: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPTS / "check-compiler.sh"), *compilers], capture_output=True,
                          text=True, timeout=120, check=False)


@needs_gcc
def test_the_compiler_check_passes_a_plain_compiler():
    done = check_compiler("g++")
    assert done.returncode == 0, done.stderr
    assert "g++ link libstdc++ as a shared library" in done.stderr


@needs_gcc
def test_the_compiler_check_refuses_one_that_links_libstdcxx_statically(tmp_path):
    wrapper = tmp_path / "g++-static"
    wrapper.write_text('#!/bin/sh\nexec g++ -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    done = check_compiler("g++", str(wrapper))
    assert done.returncode == 2
    assert f"{wrapper} links libstdc++ statically into shared libraries" in done.stderr
    assert "libstdc++.so found at: /" in done.stderr and "-static-libstdc++ in its specs: no" in done.stderr


def test_the_compiler_check_names_a_missing_compiler():
    done = check_compiler("no-such-c++")
    assert done.returncode == 2 and "compiler not found: no-such-c++" in done.stderr
