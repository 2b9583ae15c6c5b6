"""`udquant recipe extract|show|check`: library functions the CLI prints."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from gguf import GGML_QUANT_SIZES

from udquant.errors import InputError, RecipeError
from udquant.extract import Fidelity, extract_recipe, measure_fidelity, role_of
from udquant.gguf_header import GGUFHeader, parse_ggml_type, read_gguf_header
from udquant.library import recipes_dir
from udquant.recipe import RECIPE_ID, Recipe, layer_of, plan_quantization
from udquant.resolve import REPO_ID
from udquant.template import TemplateLayout, read_template_file, read_template_remote


def read_template(source: str, *, file_glob: str | None, revision: str | None, token: str | None) -> TemplateLayout:
    if Path(source).exists() or source.endswith(".gguf"):
        return read_template_file(Path(source))
    if not REPO_ID.fullmatch(source):
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


def read_model_header(model: Path, recipe: Recipe) -> GGUFHeader:
    """The header of a model GGUF the recipe is made for: another kind of GGUF (an imatrix, an mmproj)
    or a model of another architecture would give a plan or a fidelity that means nothing."""
    header = read_gguf_header(model, check_data=False)
    kind = header.metadata.get("general.type", "model")  # older converters did not write it
    if kind != "model":
        raise InputError(f"{model}: a GGUF file, but not a model (general.type={kind!r})",
                         hint="give a model GGUF: the BF16 conversion, a quant or a template")
    arch = str(header.metadata.get("general.architecture", ""))
    if recipe.arch not in ("any", arch):
        raise RecipeError(f"recipe {recipe.id} is for architecture {recipe.arch}, and {model.name} is "
                          f"{arch or 'of no architecture (no general.architecture)'}",
                          hint=_recipe_hint(arch, recipe.level))
    return header


def _recipe_hint(arch: str, level: str) -> str:
    ids = [f"{folder}/{level}" for folder in (arch, "generic")
           if folder and (recipes_dir() / folder / f"{level}.yaml").is_file()]
    return f"use {' or '.join(ids)}" if ids else f"use a recipe made for {arch or 'this model'}"


def report_for_model(recipe: Recipe, model: Path) -> RecipeReport:
    header = read_model_header(model, recipe)
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
    header = read_model_header(model, recipe)
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


@dataclass(frozen=True)
class TrackedTemplate:
    """One entry of the tracked list: the library recipe that follows a template file in a Hub repo."""

    recipe_id: str
    repo: str
    file: str
    revision: str | None = None


_TRACKED_KEYS = ("recipe", "repo", "file", "revision")
_TRACKED_FORMAT = "- {recipe: qwen3/UD-Q4_K_XL, repo: unsloth/Qwen3-32B-GGUF, file: '*UD-Q4_K_XL*'}"


def read_tracked(path: Path) -> list[TrackedTemplate]:
    """The tracked list, every entry checked before any request is made."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"tracked list {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"tracked list {path}: is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise InputError(f"cannot read tracked list {path}: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"tracked list {path}: not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise RecipeError(f"tracked list {path}: a YAML list of templates, not a {type(data).__name__}",
                          hint=f"one line per template: {_TRACKED_FORMAT}")
    entries: list[TrackedTemplate] = []
    for number, entry in enumerate(data, 1):
        where = f"tracked list {path}: entry {number}"
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: a mapping with recipe, repo and file, not {entry!r}",
                              hint=f"one line per template: {_TRACKED_FORMAT}")
        missing = [key for key in _TRACKED_KEYS[:3] if not isinstance(entry.get(key), str) or not entry[key]]
        unknown = [str(key) for key in entry if key not in _TRACKED_KEYS]
        if missing or unknown:
            problems = ([f"needs {', '.join(missing)} (text)"] if missing else []) + \
                       ([f"unknown keys {', '.join(unknown)}"] if unknown else [])
            raise RecipeError(f"{where}: {'; '.join(problems)}", hint=f"one line per template: {_TRACKED_FORMAT}")
        if not RECIPE_ID.fullmatch(entry["recipe"]):  # it names the file refresh writes
            raise RecipeError(f"{where}: recipe {entry['recipe']!r} is not a library id such as qwen3/UD-Q4_K_XL")
        if not REPO_ID.fullmatch(entry["repo"]):
            raise RecipeError(f"{where}: repo {entry['repo']!r} is not a Hub repo id (owner/name)")
        revision = entry.get("revision")
        if revision is not None and not isinstance(revision, str):
            raise RecipeError(f"{where}: revision must be a branch, tag or commit, not {revision!r}")
        if any(e.recipe_id == entry["recipe"] for e in entries):
            raise RecipeError(f"{where}: recipe {entry['recipe']} is tracked twice")
        entries.append(TrackedTemplate(entry["recipe"], entry["repo"], entry["file"], revision))
    return entries


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3, column 8: expected ...' rather than PyYAML's several lines about a '<unicode string>'."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def refresh_recipes(tracked: Path, *, token: str | None = None) -> list[RefreshOutcome]:
    """Re-extract every tracked template and rewrite recipes whose rules changed."""
    from udquant.errors import UdquantError
    from udquant.extract import dump_recipe
    from udquant.template import read_template_remote
    from udquant.workdir import write_text_atomic

    outcomes = []
    for entry in read_tracked(tracked):
        target = recipes_dir() / f"{entry.recipe_id}.yaml"
        try:
            layout = read_template_remote(entry.repo, entry.file, revision=entry.revision, token=token)
            document = extract_recipe(layout, recipe_id=entry.recipe_id, level=entry.recipe_id.rsplit("/", 1)[-1])
        except UdquantError as err:
            outcomes.append(RefreshOutcome(entry.recipe_id, "failed", err.message.splitlines()[0]))
            continue
        current = _current_recipe(target)
        provenance = current.get("provenance")
        made_from_template = isinstance(provenance, dict) and provenance.get("kind") == "template"
        if made_from_template and _comparable(current) == _comparable(document):
            outcomes.append(RefreshOutcome(entry.recipe_id, "unchanged", f"{entry.repo}@{layout.revision}"))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, dump_recipe(document))
        outcomes.append(RefreshOutcome(entry.recipe_id, "updated", f"{entry.repo}@{layout.revision}"))
    return outcomes


def _current_recipe(path: Path) -> dict[str, Any]:
    """The library recipe refresh may replace; one that is not a readable mapping is replaced."""
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
