"""The eval stage: KL divergence of GGUF files against their BF16 model, cached in the work dir.

The BF16 model's log-probabilities on the eval text are computed once per (model, text,
chunks, context); each measured file's numbers are kept beside them, keyed by the file's
identity, so a rerun after a failure later in the job (or `udquant eval` run again with one
more file) measures only what is new.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udquant.errors import InputError
from udquant.evaluate import (
    DEFAULT_EVAL_CHUNKS,
    DEFAULT_EVAL_CONTEXT,
    MAX_EVAL_CHUNKS,
    MIN_COMPARED_TOKENS,
    EvalResult,
    QuantEval,
    base_logits_bytes,
    bits_per_weight,
    compute_logits_base,
    measure_quant,
    quantize_reference,
    read_model_facts,
)
from udquant.fetch import check_disk_space
from udquant.imatrix import Imatrix
from udquant.library import data_file
from udquant.output import LevelOutput, sha256_file
from udquant.toolchain import Toolchain
from udquant.workdir import StageDir, input_key, open_stage, write_text_atomic

logger = logging.getLogger(__name__)

BASE_LOGITS_NAME = "base.logits"
SPLIT_NAME = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


@dataclass(frozen=True)
class EvalSettings:
    """What the quants are measured on; the bundled held-out text by default."""

    text: Path | None = None  # None: the bundled eval.txt
    chunks: int = DEFAULT_EVAL_CHUNKS
    context: int = DEFAULT_EVAL_CONTEXT

    @property
    def text_path(self) -> Path:
        return self.text if self.text is not None else data_file("eval.txt")

    def check(self) -> None:
        """Refuse settings llama-perplexity would turn into an error buried in its log."""
        if not 1 <= self.chunks <= MAX_EVAL_CHUNKS:
            raise InputError(f"--eval-chunks must be between 1 and {MAX_EVAL_CHUNKS}, not {self.chunks}")
        if self.context < 32 or self.context % 2:
            raise InputError(f"--eval-context must be an even number >= 32, not {self.context}")
        scored = self.chunks * (self.context - 1 - self.context // 2)
        if scored < MIN_COMPARED_TOKENS:
            raise InputError(f"{self.chunks} chunk(s) of {self.context} tokens score {scored} tokens; llama-perplexity "
                             f"reports KL divergence from {MIN_COMPARED_TOKENS} on",
                             hint="raise --eval-chunks or --eval-context")
        text = self.text_path
        if not text.is_file():
            raise InputError(f"eval text not found: {text}")
        if text.stat().st_size == 0:
            raise InputError(f"eval text is empty: {text}")

    def describe(self) -> dict[str, Any]:
        """For the result JSON: which text (name and digest, never a local path) and how much of it."""
        text = self.text_path
        return {"text": text.name, "bundled": self.text is None, "sha256": sha256_file(text),
                "bytes": text.stat().st_size, "chunks": self.chunks, "context": self.context}


def eval_disk_bytes(settings: EvalSettings, n_vocab: int, reference_bytes: int = 0) -> int:
    """What the eval stage writes: the base logits (can be GBs for a large vocabulary) and the
    standard quants it compares with."""
    return base_logits_bytes(n_vocab, settings.context, settings.chunks) + reference_bytes


def file_identity(path: Path) -> dict[str, Any]:
    """Cheap identity of a large local file: a rewrite changes its size or mtime."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def require_plotting() -> None:
    """The KLD plot needs matplotlib (the eval extra): say so before any work, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("plotting KL divergence needs matplotlib, which is not installed",
                         hint="pip install 'udquant[eval]'") from None


def base_logits_stage(toolchain: Toolchain, bf16: Path, bf16_key: str, settings: EvalSettings,
                      work_dir: Path, *, disk_reserve: int = 0, threads: int | None = None) -> tuple[StageDir, Path]:
    """The BF16 model's log-probabilities on the eval text, computed once and reused."""
    settings.check()
    text = settings.text_path
    stage = open_stage(work_dir, "eval-base", {
        "bf16": bf16_key, "eval_text": sha256_file(text), "chunks": settings.chunks,
        "context": settings.context, "llama_cpp": toolchain.tree_sha256})
    done = stage.done_output()
    if done is not None:
        return stage, done
    n_vocab = read_model_facts(bf16).n_vocab
    check_disk_space(stage.path, eval_disk_bytes(settings, n_vocab), reserve=disk_reserve)
    start = time.monotonic()
    output = compute_logits_base(toolchain, bf16, text, stage.path / BASE_LOGITS_NAME, chunks=settings.chunks,
                                 context=settings.context, log_path=stage.log(), threads=threads)
    stage.mark_done(output, time.monotonic() - start)
    return stage, output


def measure_cached(toolchain: Toolchain, stage: StageDir, base_logits: Path, quant: Path, *,
                   log_name: str, threads: int | None = None) -> EvalResult:
    """measure_quant, remembered in the base-logits stage under the quant file's identity."""
    key = input_key({"quant": file_identity(quant), "base": stage.key})
    cached = stage.path / f"kld-{key}.json"
    if cached.is_file():
        try:
            return EvalResult(**json.loads(cached.read_text()))
        except (ValueError, TypeError):
            cached.unlink()  # an older format or a damaged file: measure again
    result = measure_quant(toolchain, quant, base_logits, log_path=stage.log(log_name), threads=threads)
    write_text_atomic(cached, json.dumps(result.describe(), indent=2) + "\n")
    return result


def evaluate_levels(toolchain: Toolchain, bf16: Path, bf16_key: str, levels: Sequence[LevelOutput],
                    imatrix: Imatrix | None, settings: EvalSettings, work_dir: Path, *,
                    threads: int | None = None, disk_reserve: int = 0) -> list[QuantEval]:
    """KLD of every level, and of llama.cpp's standard quant of the same base type with the same
    imatrix, against the BF16 model."""
    stage, base_logits = base_logits_stage(toolchain, bf16, bf16_key, settings, work_dir,
                                           disk_reserve=disk_reserve, threads=threads)
    rows = []
    for level in levels:
        result = measure_cached(toolchain, stage, base_logits, level.source, log_name=f"kld-{level.level}",
                                threads=threads)
        rows.append(QuantEval(level.level, level.source.stat().st_size, level.verification.bits_per_weight, result,
                              group="UD recipe"))
    # Keyed by the imatrix too: another --imatrix must not reuse a stale reference.
    imatrix_key = sha256_file(imatrix.path)[:12] if imatrix else "none"
    for base_type in sorted({level.recipe.base for level in levels}):
        reference = stage.path / f"standard-{base_type}-{imatrix_key}.gguf"
        if not reference.is_file():
            like = max(level.source.stat().st_size for level in levels if level.recipe.base == base_type)
            check_disk_space(stage.path, like, reserve=disk_reserve)
            quantize_reference(toolchain, bf16, base_type, reference, imatrix=imatrix.path if imatrix else None,
                               log_path=stage.log(f"standard-{base_type}"), threads=threads)
        result = measure_cached(toolchain, stage, base_logits, reference, log_name=f"kld-{base_type}",
                                threads=threads)
        rows.append(QuantEval(f"{base_type} (standard)", reference.stat().st_size, bits_per_weight(reference),
                              result, group="standard"))
    return rows


def compare_files(toolchain: Toolchain, bf16: Path, quants: Sequence[Path], settings: EvalSettings,
                  work_dir: Path) -> list[QuantEval]:
    """`udquant eval`: any GGUF files of one model (ours, Unsloth's, a standard quant) against its BF16."""
    for path in (bf16, *quants):
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        if SPLIT_NAME.search(path.name):
            raise InputError(f"{path.name} is one part of a split GGUF: its size and bits per weight would be "
                             "those of that part alone",
                             hint="merge the parts first: llama-gguf-split --merge FIRST-PART OUT.gguf")
    stage, base_logits = base_logits_stage(toolchain, bf16, input_key(file_identity(bf16.resolve())), settings,
                                           work_dir)
    rows = []
    for quant in quants:
        result = measure_cached(toolchain, stage, base_logits, quant, log_name=f"kld-{quant.stem}")
        rows.append(QuantEval(quant.stem, quant.stat().st_size, bits_per_weight(quant), result))
    return rows
