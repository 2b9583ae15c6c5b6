"""Importance matrices: compute one with llama-imatrix, read GGUF or legacy .dat files,
and check that one fits the model before it is used."""

from __future__ import annotations

import logging
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from udquant.errors import ImatrixMismatchError, InputError
from udquant.gguf_header import GGUFHeader, SkippedArray, read_gguf_header
from udquant.progress import StageProgress
from udquant.recipe import main_layer_count
from udquant.runner import run_tool
from udquant.toolchain import PINNED_TAG, Toolchain, warn_if_gpu_unused
from udquant.workdir import atomic_output

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Imatrix:
    path: Path
    format: str  # "gguf" or "dat"
    widths: dict[str, int]  # tensor name -> row length (ne0) the entry was collected for
    datasets: tuple[str, ...]
    chunk_count: int | None
    chunk_size: int | None
    # tensor name -> values the entry holds: ne0 times the expert count of an expert tensor
    # (a legacy .dat stores only this total, so there it is also the width)
    values: dict[str, int]
    nextn_layers: int = 0  # MTP/NextN layers it holds entries for (imatrix.n_layer_nextn, llama-imatrix --nextn)


@dataclass(frozen=True)
class ImatrixSettings:
    calibration: Path
    chunks: int | None = None  # at most this many chunks of the text; None: all it holds
    context: int = 512


CALIBRATION_NAME = "udquant-calibration.txt"
# llama-quantize refuses a GGUF imatrix without any of these (common/imatrix-loader.cpp).
GGUF_IMATRIX_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
_BLOCK = re.compile(r"blk\.(\d+)\.")
# llama-imatrix's --nextn collects one MTP/NextN layer and stops on more ("multi-layer NextN drafts
# are not supported").
MAX_NEXTN_LAYERS = 1


def build_imatrix_args(toolchain: Toolchain, model: Path, calibration: Path, settings: ImatrixSettings,
                       output: Path, *, nextn_layers: int = 0, threads: int | None = None) -> list[str]:
    args = [str(toolchain.tool("llama-imatrix")), "-m", str(model), "-f", str(calibration),
            "-o", str(output), "--output-format", "gguf", "-c", str(settings.context), "--no-ppl"]
    if settings.chunks is not None:
        args += ["--chunks", str(settings.chunks)]
    if nextn_layers == MAX_NEXTN_LAYERS:
        # MTP/NextN layers join the graph only with --nextn (else llama-quantize quantizes them with no
        # data), which takes one sequence per batch (imatrix.cpp: batch size at most the context).
        args += ["--nextn", "-b", str(settings.context)]
    if threads:
        args += ["-t", str(threads)]
    return args


def compute_imatrix(toolchain: Toolchain, model: Path, settings: ImatrixSettings, output: Path, *,
                    log_path: Path, nextn_layers: int = 0, threads: int | None = None,
                    progress: StageProgress | None = None) -> Path:
    """Run llama-imatrix on the calibration text; write output atomically.

    It runs inside output's folder with relative names: llama-imatrix records the text's
    path in the file (imatrix.datasets), and a local path has no place in a published model.
    """
    workdir = output.parent
    if nextn_layers > MAX_NEXTN_LAYERS:
        logger.warning("the model's %d MTP layers get no imatrix data: llama-imatrix collects %d at most",
                       nextn_layers, MAX_NEXTN_LAYERS)
    shutil.copyfile(settings.calibration, workdir / CALIBRATION_NAME)
    with atomic_output(output) as partial:
        args = build_imatrix_args(toolchain, model.resolve(), Path(CALIBRATION_NAME), settings,
                                  Path(partial.name), nextn_layers=nextn_layers, threads=threads)
        run_tool(args, stage="imatrix", log_path=log_path, cwd=workdir, progress=progress)
        warn_if_gpu_unused(toolchain, log_path, "llama-imatrix")
        made = read_imatrix(partial)  # a file that does not parse must not be marked done
    if settings.chunks is not None and made.chunk_count is not None and made.chunk_count < settings.chunks:
        logger.warning("the calibration text holds %d chunks of %d tokens, not the %d asked for: the imatrix "
                       "saw them all", made.chunk_count, settings.context, settings.chunks)
    return output


def _read_gguf_imatrix(path: Path, header: GGUFHeader) -> Imatrix:
    if header.metadata.get("general.type") != "imatrix":
        raise InputError(f"{path}: a GGUF file but not an imatrix (general.type="
                         f"{header.metadata.get('general.type')!r})")
    missing = [key for key in GGUF_IMATRIX_KEYS if key not in header.metadata]
    if missing:
        raise InputError(f"{path}: an imatrix without {', '.join(missing)}, which llama-quantize "
                         f"{PINNED_TAG} refuses (\"missing imatrix metadata\")",
                         hint="make it again with a recent llama-imatrix, or convert the legacy .dat file")
    sums = [t for t in header.tensors if t.name.endswith(".in_sum2")]
    widths = {t.name[: -len(".in_sum2")]: t.shape[0] for t in sums}
    values = {t.name[: -len(".in_sum2")]: math.prod(t.shape) for t in sums}  # shape: (ne0, matrices)
    datasets = header.metadata.get("imatrix.datasets") or []
    if isinstance(datasets, SkippedArray):
        datasets = []
    return Imatrix(path, "gguf", widths, tuple(str(d) for d in datasets),
                   header.metadata.get("imatrix.chunk_count"), header.metadata.get("imatrix.chunk_size"), values,
                   int(header.metadata.get("imatrix.n_layer_nextn") or 0))


def _read_dat_imatrix(path: Path) -> Imatrix:
    """The legacy format: entry count, then (name, ncall, nval, values) per entry, then
    optionally the chunk count and the dataset name."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InputError(f"{path}: truncated or not an imatrix file")
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += size
        return int(value)

    n_entries = take("<i")
    if not 0 < n_entries < 1 << 20:
        raise InputError(f"{path}: not an imatrix file (entry count {n_entries})")
    widths: dict[str, int] = {}
    for _ in range(n_entries):
        length = take("<i")
        if not 0 < length < 4096 or pos + length > len(data):
            raise InputError(f"{path}: truncated or not an imatrix file")
        name = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        take("<i")  # ncall
        nval = take("<i")
        if nval <= 0 or pos + 4 * nval > len(data):
            raise InputError(f"{path}: truncated imatrix entry {name}")
        pos += 4 * nval
        widths[name] = nval
    chunk_count = take("<i") if pos + 4 <= len(data) else None
    datasets: tuple[str, ...] = ()
    if chunk_count is not None and pos + 4 <= len(data):
        length = take("<i")
        datasets = (data[pos:pos + length].decode("utf-8", errors="replace"),)
    return Imatrix(path, "dat", widths, datasets, chunk_count, None, dict(widths))


def read_imatrix(path: Path) -> Imatrix:
    if not path.is_file():
        raise InputError(f"imatrix file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf_imatrix(path, read_gguf_header(path))
    return _read_dat_imatrix(path)


def check_imatrix_fits(imatrix: Imatrix, model: GGUFHeader) -> None:
    """Every entry must name a tensor of this model with the same row length, and every layer must
    have entries.

    An entry holds row length x experts values, as llama-quantize requires (it stops otherwise).
    """
    shapes = {t.name: t.shape for t in model.tensors}
    unknown = [name for name in imatrix.widths if name not in shapes]
    if unknown and len(unknown) == len(imatrix.widths):
        raise ImatrixMismatchError(
            f"{imatrix.path.name} was made for another model: none of its {len(unknown)} entries "
            "names a tensor of this model", sorted(unknown))
    absent_mtp = _entries_of_absent_mtp_layers(imatrix, unknown, model)
    if absent_mtp:
        logger.warning("%s holds %d entries for the MTP layer(s) it was made with (llama-imatrix --nextn), which "
                       "this conversion lacks (--no-mtp): llama-quantize ignores them", imatrix.path.name,
                       len(absent_mtp))
    unknown = [name for name in unknown if name not in absent_mtp]
    if unknown:
        raise ImatrixMismatchError(f"{imatrix.path.name} has entries for tensors this model lacks",
                                   sorted(unknown))
    wrong = []
    for name, count in imatrix.values.items():
        if name in absent_mtp:
            continue
        shape = shapes[name]
        experts = shape[2] if len(shape) > 2 else 1
        if count == shape[0] * experts or name == "token_embd.weight":  # llama-quantize skips token_embd's
            continue
        if imatrix.widths[name] not in (shape[0], shape[0] * experts):
            wrong.append(f"{name}: imatrix width {imatrix.widths[name]}, tensor row length {shape[0]}")
        else:
            wrong.append(f"{name}: imatrix holds {count} values, llama-quantize needs {shape[0]} x {experts} "
                         f"(row length x experts)")
    if wrong:
        raise ImatrixMismatchError(f"{imatrix.path.name} does not fit this model's tensor widths",
                                   sorted(wrong))
    uncovered = uncovered_layers(imatrix, model)
    if uncovered:
        raise ImatrixMismatchError(
            f"{imatrix.path.name} has no entries for {len(uncovered)} of this model's layers (made for a model "
            "with fewer layers?); llama-quantize would quantize them without importance data", uncovered)


def _entries_of_absent_mtp_layers(imatrix: Imatrix, unknown: list[str], model: GGUFHeader) -> set[str]:
    """The entries, of those naming no tensor of the model, that belong to MTP layers the imatrix declares
    (its last imatrix.n_layer_nextn blocks) and that lie past the model's last block: the imatrix was made
    with --nextn on a conversion that kept them, and this one was converted without them. llama-quantize
    looks entries up by tensor name, so it never reads these. Any other unknown entry is another model's."""
    blocks = {int(match.group(1)) for name in imatrix.widths if (match := _BLOCK.match(name))}
    if not imatrix.nextn_layers or not blocks:
        return set()
    mtp_blocks = range(max(blocks) + 1 - imatrix.nextn_layers, max(blocks) + 1)
    past_model = 1 + max((int(match.group(1)) for t in model.tensors if (match := _BLOCK.match(t.name))), default=-1)
    return {name for name in unknown if (match := _BLOCK.match(name))
            and int(match.group(1)) in mtp_blocks and int(match.group(1)) >= past_model}


def uncovered_layers(imatrix: Imatrix, model: GGUFHeader) -> list[str]:
    """The model's layers (blk.N) holding matrices none of which has an entry, one line each.

    llama-imatrix collects every matrix multiplication of a layer's weights (tools/imatrix/imatrix.cpp:
    MUL_MAT and MUL_MAT_ID on blk.* tensors, one entry per 3-D expert tensor), so each layer it ran
    has entries; norms, convolutions and other 1-D tensors never do, nor does token_embd. Per layer,
    not per tensor: which matrices a layer multiplies depends on the architecture. MTP/NextN layers
    (the last nextn_predict_layers) get entries only from llama-imatrix --nextn, so they may lack them.
    """
    matrices: dict[int, list[str]] = {}
    for tensor in model.tensors:
        if len(tensor.shape) >= 2 and (match := _BLOCK.match(tensor.name)):
            matrices.setdefault(int(match.group(1)), []).append(tensor.name)
    if not matrices:
        return []
    _, nextn_layers = main_layer_count(model.metadata)
    first_mtp = max(matrices) + 1 - nextn_layers
    covered = {int(match.group(1)) for name in imatrix.widths if (match := _BLOCK.match(name))}
    return [f"blk.{block}: none of its {len(names)} matrices ({', '.join(_short(n, block) for n in names)})"
            for block, names in sorted(matrices.items()) if block < first_mtp and block not in covered]


def _short(name: str, block: int) -> str:
    return name.removeprefix(f"blk.{block}.").removesuffix(".weight")
