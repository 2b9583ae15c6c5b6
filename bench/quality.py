"""Benchmark (issue 7): does the UD recipe with the distill's own imatrix beat either alone?

On CPU, in a few minutes: a small llama is trained from scratch on Python's own documentation
(pydoc text of stdlib modules, shipped with every Python), continued on other modules' docs to
make a "base", and the base continued on stdlib source code to make a "distill". The distill is
then quantized five ways per level, with the job's own functions and recipes:

    standard                   llama-quantize's mixture (Q5_K_M / Q4_K_M), no imatrix
    standard + distill imatrix the same, with the distill's imatrix
    UD                         the job's recipe (UD-Q5_K_XL / UD-Q4_K_XL), no imatrix
    UD + distill imatrix       what udquant publishes
    UD + base imatrix          the shortcut udquant exists to avoid

and, to see where a difference comes from, llama.cpp's mixture with only token_embd or only
output raised to Q8_0 (the recipe raises both).

Each quant is compared with the distill's BF16 by llama-perplexity --kl-divergence, on the job's
held-out eval text (prose) and on held-out stdlib source (the distill's own domain). Imatrices
come from the job's calibration text, as in the job.

    python bench/quality.py [--out-dir udquant-out/bench-quality] [--steps-scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import sentencepiece
import torch
import transformers
from gguf import GGUFReader

from udquant.convert import convert_to_gguf
from udquant.evaluate import (
    MAX_EVAL_CHUNKS,
    QuantEval,
    bits_per_weight,
    build_reference_quantize_args,
    compute_logits_base,
    measure_quant,
    quantize_reference,
)
from udquant.gguf_header import read_gguf_header
from udquant.imatrix import ImatrixSettings, compute_imatrix, read_imatrix
from udquant.library import data_file
from udquant.plot import plot_kld_vs_bpw
from udquant.quantize import quantize_model
from udquant.recipe import find_recipe, plan_quantization
from udquant.runner import run_tool
from udquant.tiny_model import TOKENIZER_RESOURCE, TinySpec, make_tiny_model
from udquant.toolchain import Toolchain, find_toolchain
from udquant.verify import verify_quantized

# 3.7M parameters: big enough for K-quant rows (256), small enough to train on 2 cores.
MODEL = TinySpec(arch="llama", hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                 num_kv_heads=2, seed=7)
SEQUENCE, BATCH = 256, 8
PRETRAIN_DOCS = ("collections", "json", "re", "pathlib", "argparse", "logging", "functools", "itertools",
                 "string", "textwrap", "shutil", "subprocess", "threading", "queue", "heapq", "bisect",
                 "datetime", "calendar", "csv", "configparser")
BASE_DOCS = ("os", "typing", "enum", "dataclasses", "unittest", "email.message", "http.client",
             "urllib.parse")
DISTILL_CODE = ("textwrap", "shutil", "heapq", "bisect", "calendar", "csv", "configparser", "fractions",
                "statistics", "difflib")
HELD_OUT_CODE = ("ipaddress", "colorsys", "fnmatch", "glob")
HELD_OUT_CHARS = 48_000
EVAL_CONTEXT = 512


@dataclass(frozen=True)
class Phase:
    name: str
    texts: tuple[str, ...]
    kind: str  # "docs" or "code"
    steps: int
    learning_rate: float


PHASES = (Phase("pretrain", PRETRAIN_DOCS, "docs", 60, 3e-3),
          Phase("base", BASE_DOCS, "docs", 20, 1e-3),
          Phase("distill", DISTILL_CODE, "code", 40, 1e-3))


@dataclass(frozen=True)
class Variant:
    name: str
    ud: bool
    imatrix: str | None  # "distill", "base" or None
    overrides: tuple[str, ...] = ()  # llama-quantize options for a standard quant


VARIANTS = (Variant("standard", False, None), Variant("standard + distill imatrix", False, "distill"),
            Variant("UD", True, None), Variant("UD + distill imatrix", True, "distill"),
            Variant("UD + base imatrix", True, "base"),
            # Ablations: which of the recipe's two changes to llama.cpp's mixture does the work.
            Variant("ablation: Q8_0 token_embd", False, None, ("--token-embedding-type", "q8_0")),
            Variant("ablation: Q8_0 output", False, None, ("--output-tensor-type", "q8_0")))
LEVELS = ("UD-Q5_K_XL", "UD-Q4_K_XL")


# Rendered in a fresh interpreter: pydoc lists each class's subclasses, so its text depends on
# what this process has imported by then; object addresses are removed for the same reason.
_RENDER = """
import importlib, inspect, pydoc, re, sys
kind, names = sys.argv[1], sys.argv[2:]
for name in names:
    module = importlib.import_module(name)
    text = pydoc.render_doc(module, renderer=pydoc.plaintext) if kind == "docs" else inspect.getsource(module)
    sys.stdout.write(re.sub(r" at 0x[0-9a-fA-F]+", "", text) + "\\x00")
"""


def module_texts(names: tuple[str, ...], kind: str) -> list[str]:
    """pydoc text ("docs") or source ("code") of stdlib modules, the same on every run."""
    proc = subprocess.run([sys.executable, "-I", "-c", _RENDER, kind, *names], capture_output=True, text=True,
                          check=True, env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "")})
    return proc.stdout.split("\x00")[:-1]


def token_stream(tokenizer: sentencepiece.SentencePieceProcessor, names: tuple[str, ...], kind: str) -> torch.Tensor:
    ids: list[int] = []
    for text in module_texts(names, kind):
        ids += [tokenizer.bos_id(), *tokenizer.encode(text), tokenizer.eos_id()]
    return torch.tensor(ids, dtype=torch.long)


def train(model: transformers.PreTrainedModel, tokens: torch.Tensor, phase: Phase, steps: int,
          generator: torch.Generator) -> float:
    """AdamW with a short warmup and cosine decay; returns the mean loss of the last 10 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 10)
    losses = []
    model.train()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = phase.learning_rate * scale
        starts = torch.randint(0, len(tokens) - SEQUENCE - 1, (BATCH,), generator=generator)
        batch = torch.stack([tokens[s:s + SEQUENCE] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return sum(losses[-10:]) / len(losses[-10:])


def save_model(model: transformers.PreTrainedModel, template: Path, dest: Path) -> Path:
    model.to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
    model.to(torch.float32)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(template / name, dest / name)
    return dest


def train_models(work: Path, steps_scale: float, seed: int) -> tuple[Path, Path, dict[str, float]]:
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(seed)
    template = make_tiny_model(work / "init", replace(MODEL, seed=seed))
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(data_file(TOKENIZER_RESOURCE)))
    model = transformers.AutoModelForCausalLM.from_pretrained(template, dtype=torch.float32)
    losses, saved = {}, {}
    for phase in PHASES:
        start = time.monotonic()
        tokens = token_stream(tokenizer, phase.texts, phase.kind)
        steps = max(10, round(phase.steps * steps_scale))
        losses[phase.name] = train(model, tokens, phase, steps, generator)
        print(f"trained {phase.name}: {steps} steps on {len(tokens)} tokens of {phase.kind}, "
              f"final loss {losses[phase.name]:.2f} ({time.monotonic() - start:.0f} s)", flush=True)
        if phase.name in ("base", "distill"):
            saved[phase.name] = save_model(model, template, work / phase.name)
    return saved["base"], saved["distill"], losses


def imatrix_difference(base: Path, distill: Path) -> float:
    """Median over tensors of the relative L2 distance between the two mean squared activations."""
    def means(path: Path) -> dict[str, np.ndarray]:
        tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(path).tensors}
        return {name[:-len(".in_sum2")]: values / tensors[name[:-len(".in_sum2")] + ".counts"][0]
                for name, values in tensors.items() if name.endswith(".in_sum2")}

    a, b = means(base), means(distill)
    distances = [np.linalg.norm(a[n] - b[n]) / np.linalg.norm(b[n]) for n in sorted(a) if n in b]
    return float(np.median(distances))


def quantize_variant(toolchain: Toolchain, bf16: Path, level: str, variant: Variant, imatrices: dict[str, Path],
                     folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = find_recipe(level, "llama")
    imatrix_path = imatrices[variant.imatrix] if variant.imatrix else None
    if variant.overrides:
        args = build_reference_quantize_args(toolchain, bf16, folder / "model.gguf", recipe.base,
                                             imatrix=imatrix_path, threads=os.cpu_count() or 1)
        run_tool([args[0], *variant.overrides, *args[1:]], stage="bench", log_path=folder / "quantize.log")
        return folder / "model.gguf"
    if not variant.ud:
        return quantize_reference(toolchain, bf16, recipe.base, folder / "model.gguf", imatrix=imatrix_path,
                                  log_path=folder / "quantize.log")
    plan = plan_quantization(recipe, read_gguf_header(bf16))
    output = quantize_model(toolchain, bf16, plan, folder / "model.gguf",
                            imatrix=read_imatrix(imatrix_path) if imatrix_path else None,
                            log_path=folder / "quantize.log")
    verify_quantized(output, plan)
    return output


def format_table(rows: list[QuantEval]) -> str:
    head = (f"{'level':11} {'variant':27} {'BPW':>5} {'size MB':>8} {'mean KLD':>20} {'99% KLD':>9} "
            f"{'same top':>9} {'PPL':>9} {'PPL ratio':>9}")
    lines = [head, "-" * len(head)]
    for row in rows:
        r = row.result
        lines.append(f"{row.label:11} {row.group:27} {row.bits_per_weight:5.2f} "
                     f"{row.size / 1e6:8.2f} {r.mean_kld:10.6f} ± {r.mean_kld_stderr:.6f} {r.kld_p99:9.5f} "
                     f"{100 * r.same_top_p:8.2f}% {r.ppl:9.3f} {r.ppl_ratio or float('nan'):9.5f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("udquant-out/bench-quality"))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every training phase's steps")
    parser.add_argument("--seed", type=int, default=MODEL.seed, help="model initialisation and batch order")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, GGUFs, logs)")
    args = parser.parse_args()
    toolchain = find_toolchain()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="udquant-bench-quality-"))
    started = time.monotonic()
    try:
        base_dir, distill_dir, losses = train_models(work, args.steps_scale, args.seed)
        bf16 = {name: convert_to_gguf(toolchain, folder, work / f"{name}-bf16.gguf", no_mtp=False,
                                      log_path=work / f"convert-{name}.log")
                for name, folder in (("base", base_dir), ("distill", distill_dir))}
        # 64 chunks of 512: the results in README-quality.md were measured so (the job now reads the whole text).
        calibration = ImatrixSettings(data_file("calibration.txt"), chunks=64)
        imatrices = {}
        for name, model in bf16.items():
            (work / f"imatrix-{name}").mkdir()
            imatrices[name] = compute_imatrix(toolchain, model, calibration, work / f"imatrix-{name}" / "imatrix.gguf",
                                              log_path=work / f"imatrix-{name}.log")
        code_text = work / "held-out-code.txt"
        code_text.write_text("\n\n".join(module_texts(HELD_OUT_CODE, "code"))[:HELD_OUT_CHARS])
        evals = {"eval.txt (prose)": data_file("eval.txt"), "held-out stdlib code": code_text}
        bases = {label: compute_logits_base(toolchain, bf16["distill"], text, work / f"base-{i}.kld",
                                            chunks=MAX_EVAL_CHUNKS, context=EVAL_CONTEXT,
                                            log_path=work / f"base-{i}.log")
                 for i, (label, text) in enumerate(evals.items())}
        rows: dict[str, list[QuantEval]] = {label: [] for label in evals}
        for level in LEVELS:
            for index, variant in enumerate(VARIANTS):
                quant = quantize_variant(toolchain, bf16["distill"], level, variant, imatrices,
                                         work / f"{level}-{index}")
                shown = level if variant.ud else find_recipe(level, "llama").base
                for e, (label, base) in enumerate(bases.items()):
                    result = measure_quant(toolchain, quant, base, log_path=work / f"kld-{level}-{index}-{e}.log")
                    rows[label].append(QuantEval(shown, quant.stat().st_size, bits_per_weight(quant), result,
                                                 group=variant.name))
        difference = imatrix_difference(imatrices["base"], imatrices["distill"])
        report = {"model": replace(MODEL, seed=args.seed).__dict__, "seconds": round(time.monotonic() - started),
                  "training_loss": losses, "imatrix_relative_difference": difference,
                  "results": {label: [row.describe() for row in table] for label, table in rows.items()}}
        (args.out_dir / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
        for i, (label, table) in enumerate(rows.items()):
            first = table[0].result
            print(f"\n== KLD against the distill's BF16 on {label}: {first.chunks} chunks of {first.context} "
                  f"tokens; BF16 PPL {first.ppl_base:.3f}")
            print(format_table(table))
            plot_kld_vs_bpw(table, args.out_dir / f"kld-vs-bpw-{i}.png", title=f"tiny distill, {label}")
        print(f"\ntraining loss (last 10 steps): {', '.join(f'{k} {v:.2f}' for k, v in losses.items())}")
        print(f"imatrix of base vs distill: median relative difference {difference:.3f}")
        print(f"total {time.monotonic() - started:.0f} s; results in {args.out_dir}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
