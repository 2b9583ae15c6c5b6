"""Find the pinned llama.cpp build (binaries + converter) and describe it.

Looked up in order: $UDQUANT_LLAMA_CPP (a directory made by scripts/build-toolchain.sh),
then the build cache ($UDQUANT_CACHE_DIR, the repository's .cache/, ~/.cache/udquant), where a
CUDA build is preferred when the NVIDIA driver is present.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from udquant.errors import ToolchainError

logger = logging.getLogger(__name__)

PINNED_TAG = "b11434"
# ggml's message when a CUDA build finds no usable GPU, e.g. "ggml_cuda_init: failed to initialize CUDA:
# no CUDA-capable device is detected"; the tool then runs on the CPU and still succeeds.
_CUDA_FAILED = re.compile(r"failed to initialize CUDA: ?(.*)")
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split", "llama-mtmd-cli")
BUILD_HINT = "build it with: scripts/build-toolchain.sh (or set UDQUANT_LLAMA_CPP to its output)"


@dataclass(frozen=True)
class Toolchain:
    root: Path
    tag: str
    commit: str
    backend: str  # "cpu" or "cuda"
    source: str
    tree_sha256: str

    def tool(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def converter(self) -> Path:
        return self.root / "src" / "convert_hf_to_gguf.py"

    # A CUDA build needs no -ngl: llama.cpp b11434 offloads as many layers as fit in free GPU memory,
    # all when they fit (common/fit.cpp, on by default), and an explicit -ngl turns that off, so a
    # model larger than the GPU would stop with out-of-memory instead of running partly on the CPU.
    @property
    def has_gpu(self) -> bool:
        return self.backend != "cpu"

    def describe(self) -> dict[str, str]:
        return {"tag": self.tag, "commit": self.commit, "backend": self.backend,
                "source": self.source, "tree_sha256": self.tree_sha256}


def warn_if_gpu_unused(toolchain: Toolchain, log_path: Path, what: str) -> bool:
    """Say so when a CUDA build ran on the CPU: hours instead of minutes, usually a missing --gpus."""
    if not toolchain.has_gpu or not log_path.is_file():
        return False
    match = _CUDA_FAILED.search(log_path.read_text(errors="replace"))
    if match is None:
        return False
    logger.warning("%s ran on the CPU: this is a CUDA build, but CUDA did not start (%s); in Docker, run "
                   "with --gpus all", what, match.group(1).strip() or "no reason given")
    return True


def _cache_roots() -> list[Path]:
    roots = []
    if os.environ.get("UDQUANT_CACHE_DIR"):
        roots.append(Path(os.environ["UDQUANT_CACHE_DIR"]))
    roots.append(Path(__file__).resolve().parents[2] / ".cache")
    roots.append(Path.home() / ".cache" / "udquant")
    return roots


def load_toolchain(root: Path) -> Toolchain:
    """Read and check one toolchain directory."""
    root = root.resolve()  # the tools run inside stage folders: a relative path would miss them
    manifest = root / "toolchain.json"
    if not manifest.is_file():
        raise ToolchainError(f"{root} is not a udquant toolchain (no toolchain.json)", hint=BUILD_HINT)
    info = json.loads(manifest.read_text())
    if info.get("tag") != PINNED_TAG:
        raise ToolchainError(
            f"{root} holds llama.cpp {info.get('tag')}, this udquant is pinned to {PINNED_TAG}",
            hint=BUILD_HINT)
    toolchain = Toolchain(root=root, tag=info["tag"], commit=info.get("commit", ""),
                          backend=info.get("backend", "cpu"), source=info.get("source", ""),
                          tree_sha256=info.get("tree_sha256", ""))
    missing = [name for name in TOOLS if not os.access(toolchain.tool(name), os.X_OK)]
    if not toolchain.converter.is_file():
        missing.append("src/convert_hf_to_gguf.py")
    if missing:
        raise ToolchainError(f"toolchain {root} is incomplete: missing {', '.join(missing)}",
                             hint=BUILD_HINT)
    return toolchain


def find_toolchain() -> Toolchain:
    """The toolchain the job runs: $UDQUANT_LLAMA_CPP, else the newest cached build."""
    explicit = os.environ.get("UDQUANT_LLAMA_CPP")
    if explicit:
        toolchain = load_toolchain(Path(explicit))
        if toolchain.has_gpu and not nvidia_driver_present():
            # Its libggml-cuda.so links libcuda.so.1: without the driver no tool would even start.
            raise ToolchainError(f"{toolchain.root} is a CUDA build of llama.cpp and the NVIDIA driver is not "
                                 "here (libcuda.so.1 does not load)",
                                 hint="in Docker, run with --gpus all (the NVIDIA Container Toolkit mounts the "
                                      "driver); on a host, install the NVIDIA driver")
        return toolchain
    candidates: list[tuple[Path, str]] = []
    for root in _cache_roots():
        for manifest in (root / "llama.cpp").glob(f"{PINNED_TAG}-*/toolchain.json"):
            # A build that failed its check stays in NAME.partial for a look: never use it.
            if manifest.parent.name.endswith(".partial"):
                continue
            candidates.append((manifest, _manifest_backend(manifest)))
    if not candidates:
        raise ToolchainError(f"no llama.cpp {PINNED_TAG} build found", hint=BUILD_HINT)
    if not nvidia_driver_present():
        # A CUDA build's tools do not even start without libcuda.so.1.
        usable = [(manifest, backend) for manifest, backend in candidates if backend == "cpu"]
        if not usable:
            raise ToolchainError(f"only CUDA builds of llama.cpp {PINNED_TAG} found, and no NVIDIA driver here "
                                 "(libcuda.so.1)", hint="build the CPU tools with: scripts/build-toolchain.sh")
        candidates = usable
    # Prefer a GPU build when several exist, then the most recent.
    candidates.sort(key=lambda item: (item[1] != "cpu", item[0].stat().st_mtime), reverse=True)
    return load_toolchain(candidates[0][0].parent)


def _manifest_backend(manifest: Path) -> str:
    try:
        return str(json.loads(manifest.read_text()).get("backend", "cpu"))
    except (OSError, ValueError) as error:
        raise ToolchainError(f"cannot read {manifest}: {error}", hint=BUILD_HINT) from error


def nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver's libcuda.so.1 loads here (in a container: only with --gpus)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True
