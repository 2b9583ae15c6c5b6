"""Convert a Hugging Face checkpoint to a BF16 GGUF, and its vision tower to an mmproj GGUF, with the
pinned converter."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

from udquant.errors import ToolError, VerificationError
from udquant.gguf_header import read_gguf_header
from udquant.progress import StageProgress
from udquant.runner import error_lines, run_tool
from udquant.toolchain import Toolchain
from udquant.workdir import atomic_output

logger = logging.getLogger(__name__)

CONVERTER_HINTS = {
    "BPE pre-tokenizer was not recognized": (
        "the pinned converter does not know this model's pre-tokenizer (its tokenizer hash is "
        "not in llama.cpp b11434's list); the model needs a newer llama.cpp, or its "
        "tokenizer files differ from the base model's"),
    # Qwen's MTP wiring needs MTP layers, from mtp_num_hidden_layers or mtp.layers.* weights.
    "assert self.opt_num_mtp_layers != 0": (
        "the converter was asked to keep MTP layers, and the checkpoint has none: its config declares "
        "no mtp_num_hidden_layers and its weights hold no mtp.layers.* tensors; rerun with --no-mtp "
        "(or without --mtp)"),
}


def build_convert_args(toolchain: Toolchain, model_dir: Path, output: Path, *, no_mtp: bool,
                       model_name: str) -> list[str]:
    # Without --model-name the converter names the model after its folder (a download's is the
    # commit hash) or after config.json's _name_or_path (often the base model).
    args = [sys.executable, str(toolchain.converter), str(model_dir),
            "--outtype", "bf16", "--outfile", str(output), "--model-name", model_name]
    if no_mtp:
        args.append("--no-mtp")
    return args


def convert_to_gguf(toolchain: Toolchain, model_dir: Path, output: Path, *, no_mtp: bool, model_name: str,
                    log_path: Path, progress: StageProgress | None = None) -> Path:
    """Write output (BF16 GGUF) from model_dir; the file appears only when complete."""
    # The converter must use the gguf-py of its own tree, not whatever gguf is installed.
    env = {"PYTHONPATH": str(toolchain.converter.parent / "gguf-py")}
    with atomic_output(output) as partial:
        args = build_convert_args(toolchain, model_dir, partial, no_mtp=no_mtp, model_name=model_name)
        run_tool(args, stage="convert", log_path=log_path, env=env, progress=progress, hint_for=CONVERTER_HINTS)
        read_gguf_header(partial)
    return output


MMPROJ_TYPE = "f16"  # what llama.cpp's own vision projectors ship as; every backend runs it


MMPROJ_HINTS = {
    "preprocessor_config": "the model's preprocessor_config.json (image mean and std) is missing or incomplete; "
                           "pass --no-mmproj to publish the text model only",
    "is not supported": "the pinned converter cannot export this model's vision tower; "
                        "pass --no-mmproj to publish the text model only",
}


def export_mmproj(toolchain: Toolchain, model_dir: Path, output: Path, *, model_name: str,
                  log_path: Path, progress: StageProgress | None = None) -> Path:
    """Write the vision tower and projector (mmproj GGUF, for llama-mtmd-cli and llama-server)."""
    env = {"PYTHONPATH": str(toolchain.converter.parent / "gguf-py")}
    args = [sys.executable, str(toolchain.converter), str(model_dir), "--mmproj", "--outtype", MMPROJ_TYPE,
            "--model-name", model_name]
    with atomic_output(output) as partial:
        run_tool([*args, "--outfile", str(partial)], stage="mmproj", log_path=log_path, env=env,
                 progress=progress, hint_for=MMPROJ_HINTS)
        header = read_gguf_header(partial)
        if header.metadata.get("general.type") != "mmproj" or not header.tensors:
            raise VerificationError(f"the converter's mmproj file is no vision projector "
                                    f"(general.type={header.metadata.get('general.type')!r}, "
                                    f"{len(header.tensors)} tensors)")
    return output


# llama-mtmd-cli stops with exit 1 when the projector's output width is not the text model's, when
# the image cannot be encoded, or when the image tokens cannot be decoded by the text model.
# The failure is deterministic, but its reason is the tool's last line, which the pinned build's logger
# now and then loses at exit (its background thread is never flushed): run it again to read it.
REASON_ATTEMPTS = 3
MMPROJ_PAIR_HINTS = {
    "mismatch between text model": "the vision projector's output width is not the text model's embedding width",
}


def projector_margin_mib(mmproj: Path) -> int:
    """GPU memory to leave free when llama.cpp fits the text model's layers: llama-mtmd-cli loads the
    projector there afterwards (mtmd-cli.cpp), which the fitting does not count. llama.cpp's own 1 GiB
    margin, plus twice the projector's file for its weights and compute buffers."""
    return 1024 + math.ceil(2 * mmproj.stat().st_size / 2**20)


def build_mmproj_check_args(toolchain: Toolchain, text_model: Path, mmproj: Path, image: Path,
                            threads: int | None = None, fit_margin_mib: int | None = None) -> list[str]:
    # chatml: the check is about the projector and the model, not the model's own chat template.
    args = [str(toolchain.tool("llama-mtmd-cli")), "-m", str(text_model), "--mmproj", str(mmproj),
            "--image", str(image), "-p", "Describe the image.", "-n", "1", "--temp", "0", "-c", "4096",
            "--chat-template", "chatml"]
    if fit_margin_mib is not None:
        args += ["-fitt", str(fit_margin_mib)]
    if threads:
        args += ["-t", str(threads)]
    return args


def check_mmproj_pair(toolchain: Toolchain, text_model: Path, mmproj: Path, *, image: Path, log_path: Path,
                      threads: int | None = None) -> None:
    """Load the mmproj file with a quantized text model in llama-mtmd-cli and run one small image through
    both (encode, decode, one token): what a user's llama.cpp does first with the pair."""
    args = build_mmproj_check_args(toolchain, text_model, mmproj, image, threads, projector_margin_mib(mmproj))
    for attempt in range(1, REASON_ATTEMPTS + 1):
        try:
            run_tool(args, stage="mmproj-check", log_path=log_path, hint_for=MMPROJ_PAIR_HINTS)
            return
        except ToolError as err:
            if err.returncode < 0 or error_lines(log_path.read_text(errors="replace")) or attempt == REASON_ATTEMPTS:
                raise
            logger.warning("llama-mtmd-cli failed and its reason was lost at exit (attempt %d of %d); running it "
                           "again to read it", attempt, REASON_ATTEMPTS)
