"""Turn a template's per-tensor types into a compact recipe, and measure a recipe's fidelity.

Compaction groups tensors by role (the name without its layer number); a role whose layers
differ gets explicit layer lists; roles with the same per-layer pattern share one rule;
the most common type becomes the catch-all. The result is checked: compiled for the
template's own layout it must reproduce every tensor's type.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import yaml
from gguf import GGMLQuantizationType, LlamaFileType

from udquant.errors import RecipeError
from udquant.gguf_header import GGUFHeader, TensorInfo, ggml_type_name
from udquant.recipe import (
    BASE_FTYPES,
    Recipe,
    is_quantizable,
    layer_of,
    main_layer_count,
    parse_recipe,
    plan_quantization,
)
from udquant.template import TemplateLayout

_ROLE = re.compile(r"^blk\.\d+\.")
# Base type for llama-quantize when the template's general.file_type names none we accept.
_BASE_FOR_TYPE = {"q2_K": "Q2_K", "q3_K": "Q3_K_M", "q4_K": "Q4_K_M", "q5_K": "Q5_K_M", "q6_K": "Q6_K",
                  "q8_0": "Q8_0", "iq4_xs": "IQ4_XS", "iq4_nl": "IQ4_NL", "iq3_xxs": "IQ3_XXS",
                  "iq3_s": "IQ3_S", "iq2_xxs": "IQ2_XXS", "iq2_xs": "IQ2_XS", "iq2_s": "IQ2_S",
                  "iq1_s": "IQ1_S", "iq1_m": "IQ1_M", "q4_0": "Q4_0", "q5_0": "Q5_0"}


@dataclass(frozen=True)
class Fidelity:
    matched: int
    total: int
    mismatches: tuple[str, ...]

    @property
    def percent(self) -> float:
        return 100.0 * self.matched / self.total if self.total else 100.0


def role_of(name: str) -> str:
    return _ROLE.sub("blk.N.", name)


def source_header(tensors: tuple[TensorInfo, ...], metadata: dict[str, Any]) -> GGUFHeader:
    """The layout as the BF16 conversion would have it: quantizable tensors in BF16."""
    arch = str(metadata.get("general.architecture", ""))
    as_source = tuple(TensorInfo(t.name, t.shape,
                                 GGMLQuantizationType.BF16 if is_quantizable(t, arch) else t.ggml_type, t.offset)
                      for t in tensors)
    return GGUFHeader(3, metadata, as_source, 0, 32)


def measure_fidelity(recipe: Recipe, tensors: tuple[TensorInfo, ...], metadata: dict[str, Any]) -> Fidelity:
    """How many tensors the recipe, compiled for this layout, gives the type they have."""
    plan = plan_quantization(recipe, source_header(tensors, metadata))
    actual = {t.name: t.type_name for t in tensors}
    wrong = tuple(f"{t.name}: recipe {t.expected}, file {actual[t.name]}" for t in plan.tensors
                  if t.expected != actual[t.name])
    return Fidelity(len(plan.tensors) - len(wrong), len(plan.tensors), wrong)


def _base_type(metadata: dict[str, Any], catch_all: str) -> str:
    try:
        name = LlamaFileType(int(metadata.get("general.file_type", -1))).name.removeprefix("MOSTLY_")
    except ValueError:
        name = ""
    return name if name in BASE_FTYPES else _BASE_FOR_TYPE.get(catch_all, "Q8_0")


def _role_pattern(roles: list[str]) -> str:
    tails = [re.escape(r.removeprefix("blk.N.")) for r in roles]
    tail = tails[0] if len(tails) == 1 else "(" + "|".join(tails) + ")"
    return r"blk\.\d+\." + tail


def compact_rules(tensors: tuple[TensorInfo, ...], arch: str = "") -> list[dict[str, Any]]:
    quantized = [t for t in tensors if is_quantizable(t, arch)]
    if not quantized:
        raise RecipeError("the template has no quantized tensors")
    catch_all = Counter(t.type_name for t in quantized).most_common(1)[0][0]
    singles: list[dict[str, Any]] = []
    per_role: dict[str, dict[int, str]] = defaultdict(dict)
    for tensor in quantized:
        if _ROLE.match(tensor.name):
            per_role[role_of(tensor.name)][layer_of(tensor.name)] = tensor.type_name
        elif tensor.type_name != catch_all:
            singles.append({"match": re.escape(tensor.name), "type": tensor.type_name})
    # Roles with the same per-layer pattern share rules: signature -> roles.
    groups: dict[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]], list[str]] = defaultdict(list)
    for role, layers in per_role.items():
        counts = Counter(layers.values())
        default = max(counts, key=lambda t: (counts[t], t == catch_all))
        minority = tuple(sorted((t, tuple(sorted(n for n, lt in layers.items() if lt == t)))
                                for t in counts if t != default))
        groups[(default, minority)].append(role)
    layered: list[dict[str, Any]] = []
    whole: list[dict[str, Any]] = []
    for (default, minority), roles in groups.items():
        pattern = _role_pattern(sorted(roles))
        for type_name, layer_list in minority:
            layered.append({"match": pattern, "type": type_name, "layers": list(layer_list)})
        if default != catch_all:
            whole.append({"match": pattern, "type": default})
    return [*singles, *layered, *whole, {"match": ".*", "type": catch_all}]


def extract_recipe(layout: TemplateLayout, *, recipe_id: str, level: str) -> dict[str, Any]:
    """A recipe document that reproduces the template's type for every tensor."""
    arch = str(layout.metadata.get("general.architecture", ""))
    rules = compact_rules(layout.tensors, arch)
    main, nextn = main_layer_count(layout.metadata)
    widths = {role_of(t.name): t.shape[0] for t in layout.tensors if is_quantizable(t, arch)}
    document: dict[str, Any] = {
        "id": recipe_id,
        "level": level,
        "arch": layout.arch,
        "base": _base_type(layout.metadata, rules[-1]["type"]),
        "provenance": {"kind": "template", "source": layout.source, "files": list(layout.files),
                       "revision": layout.revision or "local file"},
        "made_for": {"layers": main + nextn, "nextn_layers": nextn, "widths": dict(sorted(widths.items()))},
        "rules": rules,
        "fallbacks": {},
    }
    fidelity = measure_fidelity(parse_recipe(document, recipe_id), layout.tensors, layout.metadata)
    if fidelity.matched != fidelity.total:
        raise RecipeError(f"extracted rules reproduce only {fidelity.matched}/{fidelity.total} tensors: "
                          + "; ".join(fidelity.mismatches[:5]))
    return document


def type_counts(tensors: tuple[TensorInfo, ...]) -> dict[str, int]:
    return dict(Counter(ggml_type_name(t.ggml_type) for t in tensors).most_common())


class _RecipeDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # Layer lists on one line: [0, 1, 5] reads better than one number per line.
    flow = all(isinstance(item, int) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


def dump_recipe(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_RecipeDumper, sort_keys=False, width=120, allow_unicode=True)
