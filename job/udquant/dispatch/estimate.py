"""Rough output sizes, GPU time and cost before anything is spent, from the parameter count.

The numbers are estimates shown to a person deciding whether to rent hardware; the model
is deliberately simple: download, conversion, imatrix on the GPU, llama-quantize on the
CPUs, upload, each at a documented rate.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES

from udquant.evaluate import DEFAULT_EVAL_CHUNKS, DEFAULT_EVAL_CONTEXT, base_logits_bytes
from udquant.gguf_header import parse_ggml_type
from udquant.recipe import Recipe

logger = logging.getLogger(__name__)

OVERHEAD_S = 180.0  # image pull and start
DOWNLOAD_BPS = 200e6
CONVERT_BPS = 150e6
UPLOAD_BPS = 100e6
QUANTIZE_PARAMS_PER_CPU_S = 15e6
LOAD_BPS = 1e9  # a GGUF read from local disk by llama-perplexity (--eval loads each model once)
IMATRIX_TOKENS = 26 * 512  # the bundled calibration text, all of it (26 chunks of 512 Qwen3.5 tokens)
GPU_UTILIZATION = 0.35
CPU_OFFLOAD_SLOWDOWN = 8.0
# Dense BF16 tensor TFLOPS of one accelerator, by the model name the hardware API reports.
GPU_TFLOPS = {"T4": 65.0, "L4": 121.0, "A10G": 70.0, "L40S": 362.0, "A100": 312.0, "H100": 990.0,
              "H200": 990.0, "RTX PRO 6000": 500.0}
DEFAULT_TFLOPS = 60.0
# CMAKE_CUDA_ARCHITECTURES the job image is built with: the Dockerfile's ARG CUDA_ARCHITECTURES (a test checks
# they agree). Machine code for each -real one; the last one also keeps its PTX, which newer GPUs JIT-compile.
IMAGE_CUDA_ARCHITECTURES = "80-real;86-real;89-real;90"
# CUDA compute capability of each GPU model the hardware API names (NVIDIA's table, developer.nvidia.com/cuda-gpus).
GPU_COMPUTE_CAPABILITY = {"V100": (7, 0), "T4": (7, 5), "A10G": (8, 6), "A100": (8, 0), "L4": (8, 9), "L40S": (8, 9),
                          "H100": (9, 0), "H200": (9, 0), "B200": (10, 0), "B300": (10, 3),
                          "RTX PRO 6000": (12, 0)}
_warned_models: set[str] = set()
JOB_TIME_LIMIT_HOURS = 8  # the time limit HF Jobs are started with; a job past it is stopped unfinished
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Hardware:
    """One rentable flavor, as the jobs hardware API describes it."""

    name: str
    pretty_name: str
    cpus: int
    ram_bytes: float
    disk_bytes: float
    gpu_model: str | None
    gpu_count: int
    vram_bytes: float
    cost_usd_per_minute: float


@dataclass(frozen=True)
class FlavorEstimate:
    hardware: Hardware
    minutes: float
    cost_usd: float
    fits: bool
    note: str

    def label(self) -> str:
        return f"{self.hardware.name}: ~{self.minutes:.0f} min, ~${self.cost_usd:.2f}" + (
            "" if self.fits else f" ({self.note})")


def parse_amount(text: str | None, unit: float = 1.0) -> float:
    """'24 GB' -> 24e9 with unit=1e9; '12 vCPU' -> 12."""
    match = _NUMBER.search(text or "")
    return float(match.group(1)) * unit if match else 0.0


def image_architectures(architectures: str = IMAGE_CUDA_ARCHITECTURES) -> str:
    """'80-real;86-real;89-real;90' -> '80, 86, 89 and 90', for messages."""
    names = [arch.removesuffix("-real") for arch in architectures.split(";")]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def runs_on(capability: tuple[int, int], architectures: str = IMAGE_CUDA_ARCHITECTURES) -> bool:
    """Whether kernels built for these architectures run on a GPU of this compute capability: machine code for
    X.Y runs on X.Z with Z >= Y, and PTX (an architecture without -real) is JIT-compiled on any newer GPU."""
    for arch in architectures.split(";"):
        built = divmod(int(arch.removesuffix("-real")), 10)  # 86 -> (8, 6)
        same_family = built[0] == capability[0] and built[1] <= capability[1]
        if same_family or (not arch.endswith("-real") and capability >= built):
            return True
    return False


def image_cannot_run(gpu_model: str) -> str | None:
    """Why the job image cannot run on this GPU model (ggml would abort once the billed job has started),
    or None when it can. A model missing from GPU_COMPUTE_CAPABILITY passes, with a warning: HF Jobs adds
    new GPUs, which the image's PTX serves, not old ones."""
    capability = GPU_COMPUTE_CAPABILITY.get(gpu_model.upper())
    if capability is None:
        if gpu_model not in _warned_models:
            _warned_models.add(gpu_model)
            logger.warning("the GPU model %r is not in udquant's table of compute capabilities; it is assumed to "
                           "be newer than the image's CUDA architectures (%s), whose PTX it runs",
                           gpu_model, image_architectures())
        return None
    if not runs_on(capability):
        return (f"its GPU, {gpu_model}, has compute capability {capability[0]}.{capability[1]}, and the job "
                f"image is built for CUDA architectures {image_architectures()} only")
    return None


def bits_per_weight(recipe: Recipe) -> float:
    """Bits per weight of the recipe's catch-all type (the last rule), which covers most weights."""
    block, type_size = GGML_QUANT_SIZES[parse_ggml_type(recipe.rules[-1].type)]
    return type_size * 8 / block


def output_bytes(n_params: int, bits: float) -> int:
    return int(n_params * bits / 8)


@dataclass(frozen=True)
class EvalCost:
    """What the job's --eval adds: base logits from BF16, a standard quant per level, a KLD run per file."""

    seconds_cpu_bound: float  # llama-quantize of the standard quants, divided by the CPU count later
    seconds_io_bound: float
    disk_bytes: int


def eval_cost(n_params: int, level_bytes: list[int], vocab_size: int) -> EvalCost:
    logits = base_logits_bytes(vocab_size, DEFAULT_EVAL_CONTEXT, DEFAULT_EVAL_CHUNKS) if vocab_size else 0
    io_s = (2.0 * n_params + 2 * sum(level_bytes) + logits * (1 + 2 * len(level_bytes))) / LOAD_BPS
    cpu_s = len(level_bytes) * n_params / QUANTIZE_PARAMS_PER_CPU_S
    return EvalCost(cpu_s, io_s, logits + sum(level_bytes))


def estimate_flavor(hardware: Hardware, n_params: int, level_bytes: list[int],
                    evaluation: EvalCost | None = None) -> FlavorEstimate:
    bf16 = 2.0 * n_params
    tflops = GPU_TFLOPS.get((hardware.gpu_model or "").upper(), DEFAULT_TFLOPS) * max(hardware.gpu_count, 1)
    imatrix_s = 2.0 * n_params * IMATRIX_TOKENS / (tflops * 1e12 * GPU_UTILIZATION)
    notes = []
    if hardware.vram_bytes < bf16 * 1.1:
        imatrix_s *= CPU_OFFLOAD_SLOWDOWN
        notes.append("BF16 model exceeds VRAM: partial offload")
    cpus = max(hardware.cpus, 1)
    seconds = (OVERHEAD_S + bf16 / DOWNLOAD_BPS + bf16 / CONVERT_BPS + imatrix_s
               + len(level_bytes) * n_params / (QUANTIZE_PARAMS_PER_CPU_S * cpus) + sum(level_bytes) / UPLOAD_BPS)
    disk_needed = 2 * bf16 + sum(level_bytes)
    if evaluation is not None:
        seconds += evaluation.seconds_cpu_bound / cpus + evaluation.seconds_io_bound
        disk_needed += evaluation.disk_bytes
    minutes = seconds / 60
    roomy = hardware.disk_bytes == 0 or hardware.disk_bytes >= disk_needed
    if not roomy:
        notes.append(f"needs ~{disk_needed / 1e9:.0f} GB disk")
    in_time = minutes <= JOB_TIME_LIMIT_HOURS * 60
    if not in_time:
        notes.append(f"past the {JOB_TIME_LIMIT_HOURS} h time limit")
    fits = roomy and in_time
    return FlavorEstimate(hardware, minutes, minutes * hardware.cost_usd_per_minute, fits, "; ".join(notes))


def estimate_flavors(hardware: list[Hardware], n_params: int, level_bytes: list[int],
                     evaluation: EvalCost | None = None) -> list[FlavorEstimate]:
    """GPU flavors the job image runs on only: those that fit first, then those that hold the model in VRAM,
    each cheapest first."""
    estimates = [estimate_flavor(h, n_params, level_bytes, evaluation) for h in hardware
                 if h.gpu_model and image_cannot_run(h.gpu_model) is None]
    return sorted(estimates, key=lambda e: (not e.fits, bool(e.note), e.cost_usd))
