"""End-to-end fixtures: tiny models made here, the real converter and llama.cpp binaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from udquant.errors import ToolchainError
from udquant.tiny_model import TinySpec, make_tiny_model
from udquant.toolchain import Toolchain, find_toolchain

BIN = Path(sys.executable).parent
FAST_IMATRIX = ["--imatrix-chunks", "4", "--imatrix-context", "128"]


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    try:
        return find_toolchain()
    except ToolchainError as err:
        pytest.fail(f"end-to-end tests need the pinned build: {err} (run: make toolchain)")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def get(name: str, spec: TinySpec) -> Path:
        if name not in made:
            made[name] = make_tiny_model(root / name, spec)
        return made[name]

    return get


@pytest.fixture(scope="session")
def llama(models) -> Path:
    return models("tiny-llama", TinySpec(arch="llama"))


@pytest.fixture(scope="session")
def qwen3(models) -> Path:
    return models("tiny-qwen3", TinySpec(arch="qwen3", seed=1))


@pytest.fixture(scope="session")
def odd_llama(models) -> Path:
    # Row length 320 cannot take a K-quant: llama-quantize silently falls back.
    return models("tiny-llama-320", TinySpec(arch="llama", hidden_size=320, intermediate_size=640, seed=2))


def run_cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
            program: str = "udquant-job") -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(BIN / program), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600, check=False)
