"""Read the quantized GGUF and compare every tensor's type with the plan.

llama-quantize exits 0 after silently falling back (Q6_K -> Q8_0 on a row length that is
not a multiple of 256, for instance): only the written file tells the truth.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES

from udquant.errors import VerificationError
from udquant.gguf_header import parse_ggml_type, read_gguf_header
from udquant.recipe import QuantPlan

MAX_LISTED = 20


@dataclass(frozen=True)
class Verification:
    path: Path
    type_counts: dict[str, int]  # ordered as printed: most bits first, floats last
    n_tensors: int
    n_elements: int
    n_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / self.n_elements if self.n_elements else 0.0

    @property
    def summary(self) -> str:
        """The form llama.cpp's load log uses: "q8_0: 2 tensors, q6_K: 64, f32: 353"."""
        parts = [f"{name}: {count}" for name, count in self.type_counts.items()]
        if parts:
            parts[0] += " tensors"
        return ", ".join(parts)


def _print_order(type_name: str) -> tuple[int, float]:
    block, size = GGML_QUANT_SIZES[parse_ggml_type(type_name)]
    return (block == 1, -size * 8 / block)


def _explain(expected: str, got: str, row_length: int) -> str:
    block = GGML_QUANT_SIZES[parse_ggml_type(expected)][0]
    if row_length % block:
        return (f"llama-quantize fell back: row length {row_length} is not a multiple of "
                f"{block}, which {expected} needs")
    return "llama-quantize chose another type"


def verify_quantized(path: Path, plan: QuantPlan) -> Verification:
    """Check every tensor of path against plan; raise VerificationError listing mismatches."""
    header = read_gguf_header(path)
    written = {t.name: t for t in header.tensors}
    planned = {t.name for t in plan.tensors}
    problems = []
    for tensor in plan.tensors:
        got = written.get(tensor.name)
        if got is None:
            problems.append(f"{tensor.name}: missing from the output")
        elif got.type_name != tensor.expected:
            problems.append(f"{tensor.name}: expected {tensor.expected}, got {got.type_name} "
                            f"({_explain(tensor.expected, got.type_name, tensor.shape[0])})")
    problems += [f"{name}: in the output but not in the plan" for name in written if name not in planned]
    if problems:
        listed = "\n    ".join(problems[:MAX_LISTED])
        more = f"\n    ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise VerificationError(
            f"{path.name} does not match recipe {plan.recipe.id}: {len(problems)} of "
            f"{len(plan.tensors)} tensors differ:\n    {listed}{more}",
            hint="nothing was published; declare the fallback in the recipe's 'fallbacks' if it "
                 "is acceptable, or pick types whose block size divides these row lengths")
    counts = Counter(t.type_name for t in header.tensors)
    ordered = dict(sorted(counts.items(), key=lambda item: _print_order(item[0])))
    return Verification(path, ordered, len(header.tensors),
                        sum(t.n_elements for t in header.tensors),
                        sum(t.n_bytes for t in header.tensors))
