"""`udquant recipe extract|show|check`: library functions the CLI prints."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from gguf import GGML_QUANT_SIZES

from udquant.errors import InputError
from udquant.extract import Fidelity, extract_recipe, measure_fidelity, role_of
from udquant.gguf_header import parse_ggml_type, read_gguf_header
from udquant.library import recipes_dir
from udquant.recipe import Recipe, layer_of, plan_quantization
from udquant.resolve import REPO_ID
from udquant.template import TemplateLayout, read_template_file, read_template_remote


def read_template(source: str, *, file_glob: str | None, revision: str | None, token: str | None) -> TemplateLayout:
    if Path(source).exists() or source.endswith(".gguf"):
        return read_template_file(Path(source))
    if not REPO_ID.match(source):
        raise InputError(f"{source!r} is neither a .gguf file nor a Hub repo id (owner/name)")
    if not file_glob:
        raise InputError("a Hub template needs --file GLOB, e.g. --file '*UD-Q5_K_XL*'")
    return read_template_remote(source, file_glob, revision=revision, token=token)


def extract(source: str, *, file_glob: str | None, revision: str | None, token: str | None,
            recipe_id: str | None, level: str | None) -> tuple[dict[str, object], TemplateLayout]:
    layout = read_template(source, file_glob=file_glob, revision=revision, token=token)
    level = level or _guess_level(layout.files[0])
    document = extract_recipe(layout, recipe_id=recipe_id or f"{layout.arch}/{level}", level=level)
    return document, layout


def _guess_level(file_name: str) -> str:
    stem = file_name.removesuffix(".gguf")
    for marker in ("UD-", "IQ", "Q"):
        index = stem.rfind(marker)
        if index > 0 and stem[index - 1] in "-_.":
            level = stem[index:]
            return level.split("-0000")[0]
    return stem


@dataclass(frozen=True)
class RecipeReport:
    roles: dict[str, dict[str, list[int]]]  # role -> type -> layers (-1 for tensors outside blocks)
    counts: dict[str, int]
    bits_per_weight: float
    size_bytes: int


def report_for_model(recipe: Recipe, model: Path) -> RecipeReport:
    header = read_gguf_header(model, check_data=False)
    plan = plan_quantization(recipe, header)
    roles: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    size = elements = 0
    shapes = {t.name: t for t in header.tensors}
    for tensor in plan.tensors:
        roles[role_of(tensor.name)][tensor.expected].append(layer_of(tensor.name))
        block, type_size = GGML_QUANT_SIZES[parse_ggml_type(tensor.expected)]
        count = shapes[tensor.name].n_elements
        elements += count
        size += count // block * type_size
    counts = dict(Counter(t.expected for t in plan.tensors).most_common())
    return RecipeReport({r: dict(v) for r, v in roles.items()}, counts, 8 * size / max(elements, 1), size)


def check(model: Path, recipe: Recipe) -> Fidelity:
    header = read_gguf_header(model, check_data=False)
    return measure_fidelity(recipe, header.tensors, header.metadata)


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    if layers == [-1] * len(layers):
        return "-"
    parts: list[str] = []
    run: list[int] = []
    for n in sorted(set(layers)):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


@dataclass(frozen=True)
class RefreshOutcome:
    recipe_id: str
    status: str  # "updated", "unchanged" or "failed"
    detail: str = ""


def _comparable(document: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two recipes different: types and rules, not where or when they were read."""
    return (document.get("arch"), document.get("base"), document.get("rules"), document.get("made_for"),
            document.get("fallbacks") or {})


def refresh_recipes(tracked: Path, *, token: str | None = None) -> list[RefreshOutcome]:
    """Re-extract every tracked template and rewrite recipes whose rules changed."""
    from udquant.errors import UdquantError
    from udquant.extract import dump_recipe
    from udquant.template import read_template_remote

    entries = yaml.safe_load(tracked.read_text()) or []
    outcomes = []
    for entry in entries:
        recipe_id = str(entry["recipe"])
        target = recipes_dir() / f"{recipe_id}.yaml"
        try:
            layout = read_template_remote(str(entry["repo"]), str(entry["file"]), revision=entry.get("revision"),
                                          token=token)
            document = extract_recipe(layout, recipe_id=recipe_id, level=recipe_id.rsplit("/", 1)[-1])
        except UdquantError as err:
            outcomes.append(RefreshOutcome(recipe_id, "failed", err.message.splitlines()[0]))
            continue
        current = yaml.safe_load(target.read_text()) if target.is_file() else {}
        if current.get("provenance", {}).get("kind") == "template" and _comparable(current) == _comparable(document):
            outcomes.append(RefreshOutcome(recipe_id, "unchanged", f"{entry['repo']}@{layout.revision}"))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(dump_recipe(document))
        outcomes.append(RefreshOutcome(recipe_id, "updated", f"{entry['repo']}@{layout.revision}"))
    return outcomes
