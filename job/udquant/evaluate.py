"""Measure a quant against its BF16 model: llama-perplexity's KL divergence on a held-out text.

Two steps: the BF16 model's log-probabilities are saved once (--kl-divergence-base), then
every quant is compared with them (--kl-divergence). llama-perplexity reports most mistakes
(another model's logits, a text too short) on stderr and still exits 0, so both steps check
their inputs first and parse the log for the numbers, refusing to turn garbage into a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from udquant.errors import InputError, ToolError
from udquant.gguf_header import SkippedArray, read_gguf_header
from udquant.progress import StageProgress
from udquant.recipe import main_layer_count
from udquant.runner import error_lines, run_tool
from udquant.toolchain import Toolchain, warn_if_gpu_unused
from udquant.workdir import atomic_output, write_text_atomic

logger = logging.getLogger(__name__)

STAGE = "eval"
TOOL = "llama-perplexity"
DEFAULT_EVAL_CONTEXT = 512
DEFAULT_EVAL_CHUNKS = 16
# The cap exists for large vocabularies. Every chunk stores (context/2 - 1) log-probability
# rows of the whole vocabulary as uint16: for a 27B model with a 248k vocabulary at context
# 512 that is 255 * 248k * 2 B = 127 MB per chunk, 4 GB for 32 chunks, written once and read
# back by every quant's run. The forward passes are the cheap part: 32 * 512 = 16k tokens of
# prompt processing, a few seconds per model on one H100, so each run is dominated by loading
# the weights (54 GB for the BF16 base; about a minute from a fast disk). These are estimates,
# not measurements. The bundled eval text (24.6 kB of English) gives about 11 chunks of 512
# tokens with a ~250k-vocabulary tokenizer, so the cap binds only for a longer --eval-text.
MAX_EVAL_CHUNKS = 32
# llama-perplexity prints its summary only when it compared at least this many tokens.
MIN_COMPARED_TOKENS = 100
# Runs of a complete comparison whose summary the pinned build lost at exit (see summary_lost):
# 3 of 80 runs on a tiny model, where the process ends fastest, more on a loaded machine (and several
# times more when the output went through a pipe: runner.py lets the tool write its log file itself).
LOST_SUMMARY_ATTEMPTS = 5

LOGITS_MAGIC = b"_logits_"
_LOGITS_HEADER = struct.Struct("<8sIii")  # magic, n_ctx (uint32), n_vocab, n_chunk
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "udquant-base-logits/1"

_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|-?inf))"
_STATS = {
    "ppl": re.compile(rf"^Mean PPL\(Q\)\s*:\s*{_NUMBER}", re.MULTILINE),
    "ppl_base": re.compile(rf"^Mean PPL\(base\)\s*:\s*{_NUMBER}", re.MULTILINE),
    "ppl_ratio": re.compile(rf"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUMBER}", re.MULTILINE),
    "mean_kld": re.compile(rf"^Mean\s+KLD:\s*{_NUMBER}\s*±\s*{_NUMBER}", re.MULTILINE),
    "max_kld": re.compile(rf"^Maximum KLD:\s*{_NUMBER}", re.MULTILINE),
    "kld_p99": re.compile(rf"^99\.0%\s+KLD:\s*{_NUMBER}", re.MULTILINE),
    "median_kld": re.compile(rf"^Median\s+KLD:\s*{_NUMBER}", re.MULTILINE),
    "same_top_p": re.compile(rf"^Same top p:\s*{_NUMBER}\s*±\s*{_NUMBER}\s*%", re.MULTILINE),
}
REQUIRED_STATS = ("mean_kld", "kld_p99", "median_kld", "max_kld", "same_top_p", "ppl")
_COMPUTING = re.compile(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+)")
_VOCAB_MISMATCH = re.compile(r"inconsistent vocabulary \((\d+) vs (\d+)\)")


class EvalMismatchError(InputError):
    """The base logits were computed from another model than the quant being measured."""

    def __init__(self, base_logits: str, quant: str, what: str, base_value: object, quant_value: object) -> None:
        super().__init__(
            f"{quant} does not match the base logits {base_logits}: {what} is {base_value} for the "
            f"base, {quant_value} for the quant",
            hint="compute the base logits from the BF16 GGUF of this same model, then measure again")
        self.base_logits = base_logits
        self.quant = quant
        self.what = what
        self.base_value = base_value
        self.quant_value = quant_value


class EvalOutputError(ToolError):
    """llama-perplexity exited 0 without the result asked for (it reports many errors that way)."""

    def __init__(self, reason: str, stderr_tail: str, log_path: Path | None = None,
                 hint: str | None = None) -> None:
        super().__init__(STAGE, TOOL, 0, stderr_tail, log_path, hint=hint)
        where = f" (full log: {log_path})" if log_path else ""
        self.message = f"{STAGE}: {TOOL} {reason}{where}; last output:\n{stderr_tail}"
        self.reason = reason


@dataclass(frozen=True)
class BaseLogits:
    """A --kl-divergence-base file: its header and, when udquant wrote it, the model it came from."""

    path: Path
    context: int  # n_ctx the logits were computed with
    n_vocab: int
    chunks: int
    architecture: str | None = None  # from the sidecar
    context_length: int | None = None  # the base model's trained context, from the sidecar
    layers: int | None = None  # the base model's layers without MTP/NextN layers, from the sidecar
    embedding_length: int | None = None  # from the sidecar


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    n_vocab: int
    context_length: int | None
    # Without MTP/NextN layers: a quant converted without them computes the same logits.
    layers: int | None = None
    embedding_length: int | None = None


@dataclass(frozen=True)
class EvalResult:
    """What llama-perplexity --kl-divergence printed, as numbers."""

    mean_kld: float
    mean_kld_stderr: float
    kld_p99: float
    median_kld: float
    max_kld: float
    same_top_p: float  # fraction of tokens where quant and base agree on the most likely token
    ppl: float  # perplexity of the quant on the eval text
    ppl_base: float | None
    ppl_ratio: float | None
    chunks: int
    context: int

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuantEval:
    """One measured file, as it appears in the card table, the result JSON and the plot."""

    label: str
    size: int  # bytes
    bits_per_weight: float
    result: EvalResult
    group: str = ""  # a series in the plot, e.g. "UD recipe" or "standard"

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "size": self.size, "bits_per_weight": round(self.bits_per_weight, 4),
                "group": self.group, **self.result.describe()}


def logits_row_width(n_vocab: int) -> int:
    """uint16 values stored per token (perplexity.cpp: nv = 2*((n_vocab + 1)/2) + 4)."""
    return 2 * ((n_vocab + 1) // 2) + 4


def base_logits_bytes(n_vocab: int, context: int, chunks: int) -> int:
    """The exact size of a base-logits file, for disk checks and to detect a cut-short file."""
    scored = context - 1 - context // 2
    return _LOGITS_HEADER.size + chunks * context * 4 + chunks * scored * logits_row_width(n_vocab) * 2


def build_base_logits_args(toolchain: Toolchain, model: Path, eval_text: Path, output: Path, *,
                           chunks: int, context: int, threads: int | None = None) -> list[str]:
    args = [str(toolchain.tool(TOOL)), "-m", str(model), "-f", str(eval_text), "-c", str(context),
            "--chunks", str(chunks), "--kl-divergence-base", str(output)]
    return args + (["-t", str(threads)] if threads else [])


def build_kld_args(toolchain: Toolchain, quant: Path, base_logits: Path, *, context: int,
                   threads: int | None = None) -> list[str]:
    # No -f: the tokens are read from the base-logits file, so both runs see the same text.
    args = [str(toolchain.tool(TOOL)), "-m", str(quant), "--kl-divergence-base", str(base_logits),
            "--kl-divergence", "-c", str(context)]
    return args + (["-t", str(threads)] if threads else [])


def read_model_facts(gguf: Path) -> ModelFacts:
    """Vocabulary size (the token list llama.cpp counts), trained context, layers and width of a GGUF model."""
    metadata = read_gguf_header(gguf, check_data=False).metadata
    arch = str(metadata.get("general.architecture", ""))
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, SkippedArray):
        n_vocab = tokens.length
    elif isinstance(tokens, list):
        n_vocab = len(tokens)
    elif f"{arch}.vocab_size" in metadata:
        n_vocab = int(metadata[f"{arch}.vocab_size"])
    else:
        raise InputError(f"{gguf.name} has no tokenizer: it cannot be evaluated")
    context = metadata.get(f"{arch}.context_length")
    width = metadata.get(f"{arch}.embedding_length")
    layers = main_layer_count(metadata)[0] if f"{arch}.block_count" in metadata else None
    return ModelFacts(arch, n_vocab, int(context) if context is not None else None, layers,
                      int(width) if width is not None else None)


def sidecar_path(base_logits: Path) -> Path:
    return base_logits.with_name(base_logits.name + SIDECAR_SUFFIX)


def read_base_logits(path: Path) -> BaseLogits:
    """Read and check a base-logits file's header and size, and its sidecar when present."""
    if not path.is_file():
        raise InputError(f"base logits not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_LOGITS_HEADER.size)
    if len(head) < _LOGITS_HEADER.size or not head.startswith(LOGITS_MAGIC):
        raise InputError(f"{path.name} is not a llama-perplexity base-logits file or is cut short "
                         f"({size} bytes)", hint="compute it again")
    _, context, n_vocab, chunks = _LOGITS_HEADER.unpack(head)
    if context < 4 or n_vocab <= 0 or chunks <= 0:
        raise InputError(f"{path.name}: implausible header (context {context}, vocabulary {n_vocab}, "
                         f"{chunks} chunks)", hint="compute it again")
    expected = base_logits_bytes(n_vocab, context, chunks)
    if size != expected:
        raise InputError(f"{path.name} is truncated or corrupt: {size} bytes, its header "
                         f"({chunks} chunks of {context}, vocabulary {n_vocab}) needs {expected}",
                         hint="compute it again")
    info: dict[str, Any] = {}
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        info = json.loads(sidecar.read_text())
        if info.get("format") != SIDECAR_FORMAT or info.get("n_vocab") != n_vocab:
            raise InputError(f"{sidecar.name} does not describe {path.name}", hint="compute it again")
    # Sidecars of earlier versions lack layers and embedding_length: those checks are then skipped.
    return BaseLogits(path, context, n_vocab, chunks, info.get("architecture"), info.get("context_length"),
                      info.get("layers"), info.get("embedding_length"))


def check_base_fits(base: BaseLogits, quant: Path, facts: ModelFacts) -> None:
    """Refuse to compare a quant with logits of another model: llama-perplexity would print numbers."""
    if facts.n_vocab != base.n_vocab:
        raise EvalMismatchError(base.path.name, quant.name, "the vocabulary size", base.n_vocab, facts.n_vocab)
    if base.architecture and facts.architecture and base.architecture != facts.architecture:
        raise EvalMismatchError(base.path.name, quant.name, "the architecture", base.architecture,
                                facts.architecture)
    for what, base_value, quant_value in (
            ("the layer count (without MTP layers)", base.layers, facts.layers),
            ("the embedding length", base.embedding_length, facts.embedding_length)):
        if base_value is not None and quant_value is not None and base_value != quant_value:
            raise EvalMismatchError(base.path.name, quant.name, what, base_value, quant_value)
    if base.context_length is not None and facts.context_length is not None \
            and base.context_length != facts.context_length:
        raise EvalMismatchError(base.path.name, quant.name, "the trained context length", base.context_length,
                                facts.context_length)
    if facts.context_length is not None and base.context > facts.context_length:
        raise EvalMismatchError(base.path.name, quant.name, "the eval context (base) against the trained "
                                "context length (quant)", base.context, facts.context_length)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(line for line in text.splitlines()[-lines:] if line.strip())


def _number(name: str, text: str, group: int = 1) -> float | None:
    match = _STATS[name].search(text)
    return float(match.group(group)) if match else None


def parse_kld_output(text: str, *, log_path: Path | None = None) -> EvalResult:
    """The numbers of one llama-perplexity --kl-divergence run, from its merged output."""
    if mismatch := _VOCAB_MISMATCH.search(text):
        raise EvalMismatchError("(as llama-perplexity read them)", "the quant", "the vocabulary size",
                                int(mismatch.group(1)), int(mismatch.group(2)))
    errors = "\n".join(error_lines(text)) or _tail(text)
    computing = _COMPUTING.search(text)
    if computing is None:
        raise EvalOutputError("did not start the comparison", errors, log_path)
    chunks, context = int(computing.group(1)), int(computing.group(2))
    if summary_lost(text):
        raise EvalOutputError("printed no complete KL-divergence statistics", _tail(text), log_path,
                              hint="the run completed but its last lines were lost at exit (llama.cpp b11434 does "
                                   "not flush its log, ggml-org/llama.cpp#22142); run it again")
    found = {name: _number(name, text) for name in _STATS}
    if found["mean_kld"] is None:
        compared = chunks * (context - 1 - context // 2)
        hint = None
        if compared < MIN_COMPARED_TOKENS:
            hint = (f"it compared {compared} tokens and prints statistics from {MIN_COMPARED_TOKENS} on: "
                    "use more chunks, a longer context or a longer eval text")
        raise EvalOutputError("printed no KL-divergence statistics", errors, log_path, hint=hint)
    values = {name: value for name, value in found.items() if value is not None}
    missing = [name for name in REQUIRED_STATS if name not in values]
    if missing:
        raise EvalOutputError(f"printed no {', '.join(missing)}", _tail(text), log_path)
    not_finite = [name for name in REQUIRED_STATS if not math.isfinite(values[name])]
    if not_finite:
        raise EvalOutputError(f"printed non-finite {', '.join(not_finite)}", _tail(text), log_path)
    return EvalResult(
        mean_kld=values["mean_kld"], mean_kld_stderr=_number("mean_kld", text, group=2) or 0.0,
        kld_p99=values["kld_p99"], median_kld=values["median_kld"], max_kld=values["max_kld"],
        same_top_p=round(values["same_top_p"] / 100.0, 8), ppl=values["ppl"], ppl_base=found["ppl_base"],
        ppl_ratio=found["ppl_ratio"], chunks=chunks, context=context)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compute_logits_base(toolchain: Toolchain, bf16_gguf: Path, eval_text: Path, output: Path, *,
                        chunks: int = DEFAULT_EVAL_CHUNKS, context: int = DEFAULT_EVAL_CONTEXT,
                        log_path: Path, threads: int | None = None, progress: StageProgress | None = None) -> Path:
    """Save the BF16 model's log-probabilities on eval_text to output (with a sidecar describing it).

    The file appears only when complete and checked; a text too short for one chunk is an
    InputError, not an empty file.
    """
    if not 1 <= chunks <= MAX_EVAL_CHUNKS:
        raise InputError(f"eval chunks must be between 1 and {MAX_EVAL_CHUNKS}, not {chunks}")
    if context < 32 or context % 2:
        raise InputError(f"eval context must be an even number >= 32, not {context}")
    if not eval_text.is_file():
        raise InputError(f"eval text not found: {eval_text}")
    facts = read_model_facts(bf16_gguf)
    with atomic_output(output) as partial:
        args = build_base_logits_args(toolchain, bf16_gguf, eval_text, partial, chunks=chunks, context=context,
                                      threads=threads)
        run_tool(args, stage=STAGE, log_path=log_path, progress=progress)
        warn_if_gpu_unused(toolchain, log_path, "llama-perplexity")
        base = _check_written_base(partial, log_path, eval_text, context)
        if base.chunks < chunks:
            logger.info("%s holds %d chunks of %d tokens, fewer than the %d asked for: measuring on those",
                        eval_text.name, base.chunks, context, chunks)
        sidecar = {"format": SIDECAR_FORMAT, "model": bf16_gguf.name, "architecture": facts.architecture,
                   "n_vocab": base.n_vocab, "context_length": facts.context_length, "layers": facts.layers,
                   "embedding_length": facts.embedding_length, "context": base.context,
                   "chunks": base.chunks, "eval_text": eval_text.name, "eval_text_sha256": _sha256(eval_text)}
        write_text_atomic(sidecar_path(output), json.dumps(sidecar, indent=2) + "\n")
    return output


def _check_written_base(partial: Path, log_path: Path, eval_text: Path, context: int) -> BaseLogits:
    try:
        return read_base_logits(partial)
    except InputError:
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        errors = error_lines(text)
        if any("you need at least" in line for line in errors):
            raise InputError(f"{eval_text.name} is too short for one eval chunk of {context} tokens: "
                             + " ".join(errors), hint="use a longer eval text or a smaller context") from None
        raise EvalOutputError("wrote no usable base logits", "\n".join(errors) or _tail(text), log_path) from None


def summary_lost(text: str) -> bool:
    """Whether a run compared enough tokens and reported no error, yet its summary is cut short.

    llama.cpp b11434 never flushes its logger at exit (the singleton is leaked on purpose, see
    common/log.cpp and ggml-org/llama.cpp#22142), so now and then the last lines of a complete
    run, all or part of the summary parsed here, never reach the pipe. "Same top p" is the
    summary's last line. The run is deterministic: repeat it.
    """
    computing = _COMPUTING.search(text)
    if computing is None or error_lines(text) or _STATS["same_top_p"].search(text):
        return False
    chunks, context = int(computing.group(1)), int(computing.group(2))
    return chunks * (context - 1 - context // 2) >= MIN_COMPARED_TOKENS


def measure_quant(toolchain: Toolchain, quant_gguf: Path, base_logits: Path, *, log_path: Path,
                  threads: int | None = None, progress: StageProgress | None = None) -> EvalResult:
    """KL divergence and top-token agreement of quant_gguf against the base logits."""
    base = read_base_logits(base_logits)
    check_base_fits(base, quant_gguf, read_model_facts(quant_gguf))
    args = build_kld_args(toolchain, quant_gguf, base_logits, context=base.context, threads=threads)
    for attempt in range(1, LOST_SUMMARY_ATTEMPTS + 1):
        run_tool(args, stage=STAGE, log_path=log_path, progress=progress)
        text = log_path.read_text(errors="replace")
        if not summary_lost(text):
            break
        logger.warning("%s: llama-perplexity's summary was lost at exit (attempt %d of %d)%s", quant_gguf.name,
                       attempt, LOST_SUMMARY_ATTEMPTS, "; running it again" if attempt < LOST_SUMMARY_ATTEMPTS else "")
    result = parse_kld_output(text, log_path=log_path)
    if (result.chunks, result.context) != (base.chunks, base.context):
        raise EvalOutputError(f"compared {result.chunks} chunks of {result.context} tokens, the base logits "
                              f"hold {base.chunks} of {base.context}", _tail(text), log_path)
    return result


def build_reference_quantize_args(toolchain: Toolchain, source: Path, output: Path, base_type: str, *,
                                  imatrix: Path | None, threads: int) -> list[str]:
    """llama-quantize's own mixture for base_type (Q5_K_M, ...): the standard quant a UD level is compared with."""
    args = [str(toolchain.tool("llama-quantize"))]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    return [*args, str(source), str(output), base_type, str(threads)]


def quantize_reference(toolchain: Toolchain, source: Path, base_type: str, output: Path, *,
                       imatrix: Path | None, log_path: Path, threads: int | None = None,
                       progress: StageProgress | None = None) -> Path:
    """Write the standard quant of base_type (measured only, never published); atomically."""
    with atomic_output(output) as partial:
        args = build_reference_quantize_args(toolchain, source, partial, base_type, imatrix=imatrix,
                                             threads=threads or os.cpu_count() or 1)
        run_tool(args, stage=STAGE, log_path=log_path, progress=progress)
        read_gguf_header(partial)
    return output


def bits_per_weight(gguf: Path) -> float:
    """Bits per weight over all tensors, as verify.py counts them."""
    tensors = read_gguf_header(gguf).tensors
    elements = sum(t.n_elements for t in tensors)
    return 8 * sum(t.n_bytes for t in tensors) / elements if elements else 0.0


def _size_text(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def render_eval_table(rows: Sequence[QuantEval]) -> str:
    """The card's Markdown table: one row per measured file."""
    lines = ["| Quant | Size | Bits per weight | Mean KLD | 99% KLD | Same top token | PPL ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        result = row.result
        ratio = f"{result.ppl_ratio:.4f}" if result.ppl_ratio is not None else "n/a"
        lines.append(f"| {row.label} | {_size_text(row.size)} | {row.bits_per_weight:.2f} | "
                     f"{result.mean_kld:.6f} | {result.kld_p99:.6f} | {100 * result.same_top_p:.2f}% | {ratio} |")
    return "\n".join(lines)
