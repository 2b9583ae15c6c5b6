"""Recipes: ordered, anchored rules (tensor name -> ggml type), loaded from recipes/*.yaml.

A recipe is data. plan_quantization() turns it into an explicit type for every tensor of
one model, predicting what llama-quantize will really write (its silent K-quant fallbacks
included), so that nothing is left to llama.cpp's layer-counting default mixture.
"""

from __future__ import annotations

import hashlib
import re
import re._parser as _sre_parser  # the stdlib's own parser: lets us inspect a pattern's structure
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from udquant.errors import InputError, RecipeError
from udquant.gguf_header import GGUFHeader, TensorInfo, ggml_type_name, parse_ggml_type
from udquant.library import recipes_dir

# llama-quantize's base types (ftypes) a recipe may name.
BASE_FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
               "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_XS", "IQ4_NL", "IQ3_XXS", "IQ3_S", "IQ3_M",
               "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")
# What llama-quantize writes instead when a row length does not fit the type's block
# (tensor_type_fallback in src/llama-quant.cpp); it still exits 0.
FALLBACKS = {
    "iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl",
    "iq2_s": "iq4_nl", "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq4_xs": "iq4_nl",
    "q2_0": "q4_0", "q2_K": "q4_0", "q3_K": "q4_0", "tq1_0": "q4_0", "tq2_0": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1",
    "q6_K": "q8_0",
}
# Types ggml_quantize_chunk cannot write: asking llama-quantize for one aborts it mid-file.
NOT_WRITABLE = ("q8_1", "q8_K", "i8", "i16", "i32", "i64", "f64")
# Types llama-quantize refuses to make without importance-matrix entries, except for the
# embeddings and the output (tensor_requires_imatrix).
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs")
NEEDS_NO_IMATRIX = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")
# Types ggml cannot write at all without importance data (ggml_quantize_requires_imatrix): on the
# embeddings and the output as well, which llama-quantize's own check lets through before it aborts
# mid-file. llama-imatrix gives those no entries unless run with --process-output (udquant does not).
ALWAYS_NEEDS_IMATRIX = ("iq1_s", "iq2_xxs", "iq2_xs")
# What llama-quantize never quantizes (tensor_allows_quantization, src/llama-quant.cpp): names
# containing one of these parts, names equal to one of the exact ones, and for glm5-next more parts.
NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                   "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                   "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
                   "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
                   *(f"time_mix_{part}.weight" for part in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0",
                                                             "a1", "a2", "g1", "g2", "decay_w1", "decay_w2",
                                                             "lerp_fused")))
NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")
NEVER_QUANTIZED_BY_ARCH = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                  "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                  "attn_v_b.weight"),
}
SELECTORS = ("all", "more_bits")
DEFAULT_LEVEL = "UD-Q5_K_XL"  # what the job makes when given no level and no recipe
# Level names and library ids (arch/LEVEL) name files under recipes/: without separators or a
# leading dot, none can reach outside it.
LEVEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RECIPE_ID = re.compile(rf"{LEVEL_NAME.pattern}/{LEVEL_NAME.pattern}")
MAX_PATTERN_LENGTH = 300
_LAYER = re.compile(r"^blk\.(\d+)\.")
# Names of every kind a catch-all rule must match.
_ANY_TENSOR = ("token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.63.ffn_down_exps.weight",
               "blk.7.ssm_alpha.weight", "v.blk.0.attn_qkv.weight", "mm.0.weight", "per_layer_token_embd.weight")


@dataclass(frozen=True)
class Rule:
    match: str
    type: str
    select: str = "all"
    layers: tuple[int, ...] | None = None

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.match, name) is not None


@dataclass(frozen=True)
class Recipe:
    id: str
    level: str
    arch: str
    base: str
    rules: tuple[Rule, ...]
    provenance: dict[str, Any]
    fallbacks: dict[str, str] = field(default_factory=dict)
    made_for: dict[str, Any] = field(default_factory=dict)  # layers, nextn_layers, widths
    source_path: Path | None = None

    @property
    def digest(self) -> str:
        text = self.source_path.read_bytes() if self.source_path else repr(self).encode()
        return hashlib.sha256(text).hexdigest()


def use_more_bits(index: int, count: int) -> bool:
    """llama.cpp's rule for which layers of a Q4_K_M/Q5_K_M mixture get Q6_K."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


def layer_of(name: str) -> int:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def is_quantizable(tensor: TensorInfo, arch: str = "") -> bool:
    """Whether llama-quantize would quantize this tensor of a model of arch at all."""
    dims = len(tensor.shape)
    while dims > 1 and tensor.shape[dims - 1] == 1:  # ggml_n_dims: trailing 1s do not count
        dims -= 1
    name = tensor.name
    parts = NEVER_QUANTIZED + NEVER_QUANTIZED_BY_ARCH.get(arch, ())
    return (dims >= 2 and name.endswith("weight") and name not in NEVER_QUANTIZED_NAMES
            and not any(part in name for part in parts))


def _has_nested_repeat(items: Any, inside_repeat: bool = False) -> bool:
    """Whether a parsed pattern repeats something that itself repeats: (a+)+, (.*)*, (x|x?)+ ...

    Such patterns backtrack catastrophically on names that almost match.
    """
    for op, arg in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            _low, high, sub = arg
            unbounded = high == _sre_parser.MAXREPEAT or high > 1
            if inside_repeat and unbounded:
                return True
            if _has_nested_repeat(sub, inside_repeat or unbounded):
                return True
        elif name == "SUBPATTERN":
            if _has_nested_repeat(arg[-1], inside_repeat):
                return True
        elif name == "BRANCH":
            if any(_has_nested_repeat(branch, inside_repeat) for branch in arg[1]):
                return True
        elif name in ("ASSERT", "ASSERT_NOT") and _has_nested_repeat(arg[1], inside_repeat):
            return True
    return False


def _check_type(name: Any, where: str) -> str:
    try:
        type_name = ggml_type_name(parse_ggml_type(str(name)))
    except ValueError:
        raise RecipeError(f"{where}: unknown ggml type {name!r}") from None
    if type_name in NOT_WRITABLE:
        raise RecipeError(f"{where}: llama-quantize cannot write {type_name} tensors")
    return type_name


def parse_recipe(data: Any, where: str, source_path: Path | None = None) -> Recipe:
    """Validate a recipe document; every problem is a RecipeError naming where it is."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with id, arch, base and rules")
    missing = [key for key in ("id", "arch", "base", "rules") if key not in data]
    if missing:
        raise RecipeError(f"{where}: missing {', '.join(missing)}")
    base = str(data["base"]).upper()
    if base not in BASE_FTYPES:
        raise RecipeError(f"{where}: base {data['base']!r} is not a llama-quantize type "
                          f"({', '.join(BASE_FTYPES)})")
    if not isinstance(data["rules"], list) or not data["rules"]:
        raise RecipeError(f"{where}: rules must be a non-empty list")
    rules = []
    for index, raw in enumerate(data["rules"]):
        at = f"{where}: rule {index + 1}"
        if not isinstance(raw, dict) or "match" not in raw or "type" not in raw:
            raise RecipeError(f"{at}: each rule needs 'match' and 'type'")
        pattern = str(raw["match"])
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise RecipeError(f"{at}: pattern longer than {MAX_PATTERN_LENGTH} characters")
        try:
            re.compile(pattern)
            parsed = _sre_parser.parse(pattern)
        except re.error as err:
            raise RecipeError(f"{at}: invalid regular expression {pattern!r}: {err}") from None
        if _has_nested_repeat(parsed):
            raise RecipeError(f"{at}: pattern {pattern!r} repeats a repetition, which can backtrack "
                              "catastrophically", hint="write it without nested quantifiers, e.g. blk\\.\\d+\\.")
        select = str(raw.get("select", "all"))
        if select not in SELECTORS:
            raise RecipeError(f"{at}: select must be one of {', '.join(SELECTORS)}, not {select!r}")
        layers = raw.get("layers")
        if layers is not None and (not isinstance(layers, list)
                                   or not all(isinstance(n, int) and n >= 0 for n in layers)):
            raise RecipeError(f"{at}: layers must be a list of layer numbers")
        rules.append(Rule(pattern, _check_type(raw["type"], at), select,
                          tuple(layers) if layers is not None else None))
    fallbacks_raw = data.get("fallbacks") or {}
    if not isinstance(fallbacks_raw, dict):
        raise RecipeError(f"{where}: fallbacks must map a type to the type accepted instead")
    fallbacks = {_check_type(k, f"{where}: fallbacks"): _check_type(v, f"{where}: fallbacks")
                 for k, v in fallbacks_raw.items()}
    level = str(data.get("level") or str(data["id"]).rsplit("/", 1)[-1])
    if not LEVEL_NAME.fullmatch(level):
        raise RecipeError(f"{where}: level {level!r} must be letters, digits, '_', '.' or '-' (it names files)")
    last = rules[-1]
    if last.layers is not None or last.select != "all" or not all(last.matches(n) for n in _ANY_TENSOR):
        raise RecipeError(f"{where}: the last rule must be a catch-all that types every tensor the others "
                          f"leave, not {last.match!r}", hint="end the rules with {match: '.*', type: ...}")
    made_for = data.get("made_for") or {}
    if not isinstance(made_for, dict) or not isinstance(made_for.get("layers", 0), int):
        raise RecipeError(f"{where}: made_for must give the template's layer count as 'layers'")
    return Recipe(id=str(data["id"]), level=level,
                  arch=str(data["arch"]), base=base, rules=tuple(rules),
                  provenance=dict(data.get("provenance") or {}), fallbacks=fallbacks,
                  made_for=made_for, source_path=source_path)


def load_recipe(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    return parse_recipe(data, str(path), source_path=path)


def check_level_name(level: str, option: str = "level") -> str:
    if not LEVEL_NAME.fullmatch(level):
        raise InputError(f"{option} {level!r} is not a level name: letters, digits, '_', '.' or '-', "
                         "such as UD-Q5_K_XL")
    return level


def find_recipe(level: str, arch: str) -> Recipe:
    """The library recipe for a level: the architecture's own, else the generic one."""
    check_level_name(level)
    root = recipes_dir()
    for candidate in (root / arch / f"{level}.yaml", root / "generic" / f"{level}.yaml"):
        if candidate.is_file():
            return load_recipe(candidate)
    levels = sorted({p.stem for p in root.glob("*/*.yaml")})
    raise RecipeError(f"no recipe for level {level!r} (architecture {arch}); "
                      f"levels in the library: {', '.join(levels)}")


def load_recipe_ref(ref: str) -> Recipe:
    """A recipe by path, or by library id such as generic/UD-Q5_K_XL."""
    path = Path(ref)
    if path.is_file():
        return load_recipe(path)
    if RECIPE_ID.fullmatch(ref) and (library := recipes_dir() / f"{ref}.yaml").is_file():
        return load_recipe(library)
    known = sorted(str(p.relative_to(recipes_dir()).with_suffix("")) for p in recipes_dir().glob("*/*.yaml"))
    raise RecipeError(f"no recipe file or library id {ref!r}; library: {', '.join(known)}")


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    source_type: str
    wanted: str  # what the recipe asks for
    expected: str  # what llama-quantize will write: wanted, or a declared fallback
    rule: int | None  # index of the rule that chose it; None when never quantized

    @property
    def quantized(self) -> bool:
        return self.rule is not None

    @property
    def written(self) -> str:
        """What llama-quantize writes, declared or not (the plan refuses types it would stop on)."""
        return (_fallback_of(self.wanted, self.shape[0]) or self.wanted) if self.quantized else self.source_type


@dataclass(frozen=True)
class QuantPlan:
    recipe: Recipe
    tensors: tuple[TensorPlan, ...]

    def tensor_type_lines(self) -> list[str]:
        """One anchored --tensor-type-file line for every quantized tensor."""
        return [f"^{re.escape(t.name)}$={t.wanted}" for t in self.tensors if t.quantized]

    def undeclared_fallbacks(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.quantized and _fallback_of(t.wanted, t.shape[0]) != t.wanted
                and t.expected == t.wanted]

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.tensor_type_lines()).encode()).hexdigest()


def check_fallbacks(plan: QuantPlan) -> None:
    """Refuse a plan in which llama-quantize would silently write types the recipe did not declare."""
    undeclared = plan.undeclared_fallbacks()
    if not undeclared:
        return
    listed = [f"{t.name}: {t.wanted} on rows of {t.shape[0]} -> {_fallback_of(t.wanted, t.shape[0])}"
              for t in undeclared[:5]]
    pairs = sorted({(t.wanted, _fallback_of(t.wanted, t.shape[0])) for t in undeclared})
    declare = ", ".join(f"{wanted}: {real}" for wanted, real in pairs)
    raise RecipeError(
        f"recipe {plan.recipe.id}: {len(undeclared)} tensors have row lengths their type's block does not "
        f"divide, and llama-quantize would write another type for them (exiting 0): {'; '.join(listed)}",
        hint=f"declare what it writes in the recipe ('fallbacks: {{{declare}}}') to accept it, "
             "or give those tensors types that fit")


def _block_size(type_name: str) -> int:
    return GGML_QUANT_SIZES[parse_ggml_type(type_name)][0]


def _fallback_of(type_name: str, row_length: int) -> str | None:
    """The type llama-quantize really writes for type_name on rows of row_length; None: it stops."""
    current = type_name
    if row_length % _block_size(current) == 0:
        return current
    if current not in FALLBACKS and _block_size(current) > 32:
        return None  # "no tensor type fallback is defined"
    current = FALLBACKS.get(current, current)
    if row_length % _block_size(current) != 0:
        return "f16"
    return current


def main_layer_count(metadata: dict[str, Any]) -> tuple[int, int]:
    """(layers without MTP/NextN layers, MTP/NextN layers) from GGUF metadata."""
    arch = metadata.get("general.architecture", "")
    blocks = int(metadata.get(f"{arch}.block_count", 0))
    nextn = int(metadata.get(f"{arch}.nextn_predict_layers", 0))
    return blocks - nextn, nextn


def map_layers(layers: tuple[int, ...], template_main: int, target_main: int,
               role_layers: tuple[int, ...]) -> frozenset[int]:
    """Carry a template's layer list to a model with another depth, by relative depth.

    role_layers are the model's layers that hold the rule's tensors (full attention may sit on
    every 4th layer only). Each listed layer lands on the nearest of them, so none is lost on a
    shallower model; on a deeper one, every role layer inside a listed layer's depth span gets it
    too. MTP/NextN layers (numbered after the main stack) keep their offset from its end.
    """
    if template_main == target_main or template_main <= 0:
        return frozenset(layers)
    listed = {n for n in layers if n < template_main}
    roles = [n for n in role_layers if n < target_main]

    def depth(n: int, count: int) -> float:
        return (n + 0.5) / count

    mapped = {t for t in roles if int(depth(t, target_main) * template_main) in listed}
    if roles:
        mapped |= {min(roles, key=lambda t: abs(depth(t, target_main) - depth(n, template_main))) for n in listed}
    mapped |= {target_main + (n - template_main) for n in layers if n >= template_main}
    return frozenset(mapped)


def type_bits(type_name: str) -> float:
    """Bits per weight of a ggml type."""
    block, size = GGML_QUANT_SIZES[parse_ggml_type(type_name)]
    return 8 * size / block


def _tied_embedding_rule(recipe: Recipe, chosen: dict[str, int], names: set[str]) -> int | None:
    """The rule a tied token_embd (no output.weight) takes: it is also the output head.

    llama.cpp gives a tied token_embd the output's type; an explicit output rule (not the
    catch-all) with more bits than token_embd's own therefore wins.
    """
    if "output.weight" in names or "token_embd.weight" not in chosen:
        return None
    for index, rule in enumerate(recipe.rules[:-1]):
        if rule.layers is None and rule.select == "all" and rule.matches("output.weight"):
            own = recipe.rules[chosen["token_embd.weight"]].type
            return index if type_bits(rule.type) > type_bits(own) else None
    return None


def plan_quantization(recipe: Recipe, header: GGUFHeader) -> QuantPlan:
    """An explicit type for every tensor of the model whose header is given."""
    arch = str(header.metadata.get("general.architecture", ""))
    candidates = [t for t in header.tensors if is_quantizable(t, arch)]
    target_main, _ = main_layer_count(header.metadata)
    template_main = int(recipe.made_for.get("layers", 0)) - int(recipe.made_for.get("nextn_layers", 0))
    chosen: dict[str, int] = {}
    for index, rule in enumerate(recipe.rules):
        # llama.cpp's counters run over every tensor of the role, claimed by an earlier rule or not.
        matching = sorted((t for t in candidates if rule.matches(t.name)), key=lambda t: (layer_of(t.name), t.name))
        layers = None
        if rule.layers is not None:
            role_layers = tuple(sorted({layer_of(t.name) for t in matching if layer_of(t.name) >= 0}))
            layers = map_layers(rule.layers, template_main, target_main, role_layers)
        for ordinal, tensor in enumerate(matching):
            if tensor.name in chosen or (layers is not None and layer_of(tensor.name) not in layers):
                continue
            if rule.select == "more_bits" and not use_more_bits(ordinal, len(matching)):
                continue
            chosen[tensor.name] = index
    tied = _tied_embedding_rule(recipe, chosen, {t.name for t in header.tensors})
    if tied is not None:
        chosen["token_embd.weight"] = tied
    untyped = [t.name for t in candidates if t.name not in chosen]
    if untyped:
        raise RecipeError(f"recipe {recipe.id} leaves {len(untyped)} tensors without a type, "
                          f"e.g. {', '.join(untyped[:5])}", hint="end the rules with a catch-all: match: '.*'")
    plans = []
    for tensor in header.tensors:
        source = tensor.type_name
        if tensor.name not in chosen:
            plans.append(TensorPlan(tensor.name, tensor.shape, source, source, source, None))
            continue
        wanted = recipe.rules[chosen[tensor.name]].type
        if tensor.name != tensor.name.lower():
            raise RecipeError(f"tensor {tensor.name} has upper-case letters: llama-quantize lower-cases every "
                              "--tensor-type pattern, so no explicit type could ever reach it")
        real = _fallback_of(wanted, tensor.shape[0])
        if real is None:
            raise RecipeError(f"recipe {recipe.id} asks for {wanted} on {tensor.name}, whose row length "
                              f"{tensor.shape[0]} is not a multiple of {_block_size(wanted)}; llama-quantize "
                              "has no fallback for it and would stop", hint="give these tensors another type")
        expected = real if recipe.fallbacks.get(wanted) == real else wanted
        plans.append(TensorPlan(tensor.name, tensor.shape, source, wanted, expected, chosen[tensor.name]))
    return QuantPlan(recipe, tuple(plans))


def quantized_type_set() -> frozenset[GGMLQuantizationType]:
    return frozenset(t for t in GGMLQuantizationType if GGML_QUANT_SIZES[t][0] > 1)
