"""Quantize a BF16 GGUF with llama-quantize, every tensor's type given explicitly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from udquant.errors import RecipeError
from udquant.imatrix import Imatrix
from udquant.progress import StageProgress
from udquant.recipe import ALWAYS_NEEDS_IMATRIX, NEEDS_IMATRIX, NEEDS_NO_IMATRIX, QuantPlan
from udquant.runner import run_tool
from udquant.toolchain import Toolchain
from udquant.workdir import atomic_output

TENSOR_TYPES_NAME = "tensor-types.txt"
IMATRIX_STEM = "imatrix"  # imatrix.gguf or imatrix.dat, as the file given


def build_quantize_args(toolchain: Toolchain, source: Path, output: Path, plan: QuantPlan,
                        *, tensor_types: Path, imatrix: Path | None, threads: int) -> list[str]:
    args = [str(toolchain.tool("llama-quantize")), "--tensor-type-file", str(tensor_types)]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    return [*args, str(source), str(output), plan.recipe.base, str(threads)]


def check_imatrix_coverage(plan: QuantPlan, imatrix: Imatrix | None, *, to_compute: bool = False) -> None:
    """IQ1/IQ2/IQ3_XXS types cannot be made without imatrix entries for their tensors; IQ1_S, IQ2_XXS and
    IQ2_XS not even on the embeddings and the output, which llama-quantize exempts from its own check.
    to_compute: the imatrix is udquant's llama-imatrix run, still to come, with entries for blk.* only."""
    needing = [t.name for t in plan.tensors if t.quantized and (
        t.written in ALWAYS_NEEDS_IMATRIX or (t.written in NEEDS_IMATRIX and t.name not in NEEDS_NO_IMATRIX))]
    covered = imatrix.widths if imatrix else {}
    missing = [name for name in needing if not (name.startswith("blk.") if to_compute else name in covered)]
    if missing:
        types = sorted({t.written for t in plan.tensors if t.name in missing})
        hint = "give an imatrix that covers them, or a recipe with other types there"
        if unfed := [name for name in missing if name in NEEDS_NO_IMATRIX]:
            hint = (f"{', '.join(unfed)} never get imatrix entries from udquant's llama-imatrix run: give them "
                    f"another type (e.g. q4_K or more), or {hint}")
        raise RecipeError(
            f"recipe {plan.recipe.id} asks for {', '.join(types)} on {len(missing)} tensors "
            f"without imatrix entries, e.g. {', '.join(missing[:5])}", hint=hint)


def quantize_model(toolchain: Toolchain, source: Path, plan: QuantPlan, output: Path, *,
                   imatrix: Imatrix | None, log_path: Path, threads: int | None = None,
                   progress: StageProgress | None = None) -> Path:
    """Write output from source following plan; the file appears only when complete.

    Runs inside output's folder with relative names, so that the imatrix path llama-quantize
    records in the file (quantize.imatrix.file) reveals nothing local.
    """
    check_imatrix_coverage(plan, imatrix)
    workdir = output.parent
    (workdir / TENSOR_TYPES_NAME).write_text("\n".join(plan.tensor_type_lines()) + "\n")
    imatrix_arg = None
    if imatrix is not None:
        local = workdir / f"{IMATRIX_STEM}.{imatrix.format}"
        if local.resolve() != imatrix.path.resolve():
            local.unlink(missing_ok=True)
            try:
                os.link(imatrix.path, local)
            except OSError:  # another file system
                shutil.copyfile(imatrix.path, local)
        imatrix_arg = Path(local.name)
    with atomic_output(output) as partial:
        args = build_quantize_args(toolchain, source.resolve(), Path(partial.name), plan,
                                   tensor_types=Path(TENSOR_TYPES_NAME), imatrix=imatrix_arg,
                                   threads=threads or os.cpu_count() or 1)
        run_tool(args, stage="quantize", log_path=log_path, cwd=workdir, progress=progress)
    return output
