"""The inspect step before any spend: what the job will make of a Hub repo, and roughly at what cost."""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import HfApi

from udquant.dispatch.estimate import (
    FlavorEstimate,
    Hardware,
    bits_per_weight,
    estimate_flavors,
    eval_cost,
    output_bytes,
)
from udquant.hub import HUB_ERRORS, hub_error, resolve_hub_model
from udquant.recipe import find_recipe, load_recipe_ref
from udquant.resolve import validate_repo_id

IMATRIX_SOURCES = {
    "compute": "computed on the distill itself by the job (llama-imatrix on the GPU, bundled calibration text)",
    "auto": "the distill's own published imatrix when one fits (mradermacher, bartowski, the repo itself), "
            "else computed on the distill",
    "none": "none: plain quantization (weaker at 4 bits and below)",
}


@dataclass(frozen=True)
class LevelPlan:
    level: str
    recipe_id: str
    bits_per_weight: float
    output_bytes: int


@dataclass(frozen=True)
class Inspection:
    repo_id: str
    revision: str | None
    hf_architecture: str
    llama_arch: str
    n_params: int
    weights_bytes: int
    base_models: tuple[str, ...]
    imatrix_source: str
    levels: tuple[LevelPlan, ...]
    drops_mtp: bool
    vocab_size: int = 0

    def estimates(self, hardware: list[Hardware], *, evaluate: bool = False) -> list[FlavorEstimate]:
        level_bytes = [level.output_bytes for level in self.levels]
        evaluation = eval_cost(self.n_params, level_bytes, self.vocab_size) if evaluate else None
        return estimate_flavors(hardware, self.n_params, level_bytes, evaluation)


def base_models_of(repo_id: str, revision: str | None, token: str | None) -> tuple[str, ...]:
    """The card's base_model entries (a distill names the model it was distilled from or into)."""
    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
    except HUB_ERRORS as err:  # no answer too: the page shows its reason, not a traceback
        raise hub_error(repo_id, err) from None
    base = getattr(info.card_data, "base_model", None)
    if isinstance(base, str):
        return (base,)
    return tuple(str(b) for b in base) if isinstance(base, list) else ()


def plan_levels(levels: tuple[str, ...], llama_arch: str, n_params: int, recipe: str = "auto") -> tuple[LevelPlan, ...]:
    plans = []
    for level in levels:
        chosen = find_recipe(level, llama_arch) if recipe == "auto" else load_recipe_ref(recipe)
        bits = bits_per_weight(chosen)
        plans.append(LevelPlan(level, chosen.id, bits, output_bytes(n_params, bits)))
    return tuple(plans)


def inspect_repo(repo_id: str, *, token: str | None, levels: tuple[str, ...], imatrix: str = "compute",
                 recipe: str = "auto") -> Inspection:
    """Describe what the job would do with repo_id, reading only metadata and headers from the Hub."""
    model = resolve_hub_model(validate_repo_id(repo_id), revision=None, token=token)
    return Inspection(
        repo_id=repo_id, revision=model.revision, hf_architecture=model.hf_architecture,
        llama_arch=model.llama_arch, n_params=model.n_params, weights_bytes=model.weights_bytes,
        base_models=base_models_of(repo_id, model.revision, token),
        imatrix_source=IMATRIX_SOURCES.get(imatrix, imatrix),
        levels=plan_levels(levels, model.llama_arch, model.n_params, recipe), drops_mtp=model.needs_no_mtp,
        vocab_size=model.vocab_size)
