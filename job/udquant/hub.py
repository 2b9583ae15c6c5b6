"""Talk to the Hugging Face Hub through huggingface_hub: describe a repo, download it."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    NotASafetensorsRepoError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)

# huggingface_hub re-exports the HTTP client it uses (its name changed across major versions).
from huggingface_hub.utils import httpx as hf_httpx  # type: ignore[attr-defined]

from udquant.errors import HubError, InputError
from udquant.resolve import ModelInfo, card_license, config_vocab_size, describe_config

# Only what the converter reads, all at the top of the repo: the weights (ModelInfo.weight_files, by
# name: "*.safetensors" would also match checkpoint-*/ and original/ copies), config, tokenizer and
# chat template files, and the card (the converter copies its license and base models into the GGUF).
MODEL_FILE_PATTERNS = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "README.md",
]


# What a Hub call can fail with: an HTTP error answer; no answer at all (a download says so with
# LocalEntryNotFoundError when the file is not cached either); offline mode; weights whose
# safetensors headers cannot be described. NO_ANSWER is the client's own transport error: since
# huggingface_hub 2 that is httpx2's, which `except httpx.HTTPError` does not catch.
NO_ANSWER = (hf_httpx.TransportError, LocalEntryNotFoundError, OfflineModeIsEnabled)
_UNDESCRIBED_WEIGHTS = (NotASafetensorsRepoError, SafetensorsParsingError)
HUB_ERRORS: tuple[type[Exception], ...] = (HfHubHTTPError, *NO_ANSWER, *_UNDESCRIBED_WEIGHTS)


def whoami(api: HfApi, *, purpose: str, token_name: str = "HF_TOKEN", otherwise: str | None = None) -> dict[str, Any]:
    """Who the token belongs to. Only an HTTP 401 or 403 is a refused token: no answer, offline mode or a
    server error says nothing about it. otherwise: what the user can do without the Hub, in every hint."""
    alternative = f", or {otherwise}" if otherwise else ""
    try:
        return api.whoami()
    except HfHubHTTPError as err:
        status = err.response.status_code
        if status in (401, 403):
            raise HubError(f"the Hub refused the token in {token_name} (HTTP {status})",
                           hint=f"check the token is valid and has write access{alternative}") from None
        raise HubError(f"checking the token in {token_name} failed: the Hub answered HTTP {status}",
                       hint=f"try again later{alternative}") from None
    except OfflineModeIsEnabled:
        raise HubError(f"{purpose} needs the Hub, and HF_HUB_OFFLINE is set",
                       hint=f"unset HF_HUB_OFFLINE{alternative}") from None
    except NO_ANSWER as err:
        raise HubError(f"cannot reach the Hub at {constants.ENDPOINT} to check the token in {token_name} "
                       f"({type(err).__name__}: {err})",
                       hint=f"check the network or HF_ENDPOINT{alternative}") from None


def hub_error(repo_id: str, err: Exception) -> HubError:
    if isinstance(err, GatedRepoError):
        return HubError(f"{repo_id} is gated and this token has no access",
                        hint="accept the model's terms on its Hub page, then set HF_TOKEN")
    if isinstance(err, RepositoryNotFoundError):
        return HubError(f"{repo_id} does not exist on the Hub, or it is private",
                        hint="check the spelling; for a private repo set HF_TOKEN")
    if isinstance(err, OfflineModeIsEnabled):
        return HubError(f"{repo_id} is on the Hub, and HF_HUB_OFFLINE is set",
                        hint="unset HF_HUB_OFFLINE, or give a local model folder")
    if isinstance(err, NO_ANSWER):
        return HubError(f"cannot reach the Hub at {constants.ENDPOINT} ({type(err).__name__}: {err})",
                        hint="check the network, or HF_ENDPOINT")
    if isinstance(err, _UNDESCRIBED_WEIGHTS):
        return HubError(f"{repo_id}: its safetensors weights cannot be described ({err})",
                        hint="udquant reads model.safetensors or model.safetensors.index.json")
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"{repo_id}: revision not found")
    return HubError(f"{repo_id}: the Hub request failed: {err}")


def resolve_hub_model(repo_id: str, *, revision: str | None, token: str | None) -> ModelInfo:
    api = HfApi(token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except HUB_ERRORS as err:
        raise hub_error(repo_id, err) from None
    files = [s.rfilename for s in info.siblings or []]
    if info.siblings is not None and "config.json" not in files:
        raise not_a_checkpoint_error(repo_id, files)
    try:
        config_path = hf_hub_download(repo_id, "config.json", revision=info.sha, token=token)
    except RemoteEntryNotFoundError:
        raise not_a_checkpoint_error(repo_id, files) from None
    except HUB_ERRORS as err:
        raise hub_error(repo_id, err) from None
    try:
        config = json.loads(Path(config_path).read_text())
    except ValueError as err:
        raise InputError(f"{repo_id}: config.json is not valid JSON ({err})") from None
    hf_arch, llama_arch, declared_mtp = describe_config(config, repo_id)
    # The converter reads the top-level files only: weights in subfolders are other copies.
    weights = [s for s in info.siblings or [] if "/" not in s.rfilename and s.rfilename.endswith(".safetensors")]
    if not weights:
        nested = [name for name in files if name.endswith(".safetensors")]
        found = f" (only in subfolders: {', '.join(nested[:3])})" if nested else ""
        raise InputError(f"{repo_id}: no *.safetensors weights at the top of the repo{found}",
                         hint="udquant converts safetensors checkpoints only, from the repo's top folder")
    indexes = [name for name in files if "/" not in name and name.endswith(".safetensors.index.json")]
    try:
        meta = api.get_safetensors_metadata(repo_id, revision=info.sha)
    except HUB_ERRORS as err:
        raise hub_error(repo_id, err) from None
    return ModelInfo(
        source=repo_id, name=repo_id.split("/")[1], repo_id=repo_id, revision=info.sha,
        local_dir=None, hf_architecture=hf_arch, llama_arch=llama_arch,
        n_params=sum(meta.parameter_count.values()),
        weights_bytes=sum(s.size or 0 for s in weights),
        weight_files=tuple(sorted([s.rfilename for s in weights] + indexes)),
        weight_names=tuple(sorted(meta.weight_map)), declared_mtp_layers=declared_mtp,
        base_models=base_model_chain(api, repo_id, info.card_data), vocab_size=config_vocab_size(config),
        license=card_license(info.card_data.to_dict() if info.card_data is not None else None))  # type: ignore[no-untyped-call]


def not_a_checkpoint_error(repo_id: str, files: list[str]) -> InputError:
    """A repo without config.json: a GGUF repo, a dataset-like or empty one."""
    ggufs = [name for name in files if name.endswith(".gguf")]
    if ggufs:
        return InputError(f"{repo_id} has no config.json: it holds GGUF files ({ggufs[0]}"
                          f"{', ...' if len(ggufs) > 1 else ''}), not a Hugging Face Transformers checkpoint",
                          hint="udquant needs the original safetensors model, not a GGUF: give that repo "
                               "(a GGUF repo's card usually names it as base_model)")
    return InputError(f"{repo_id} has no config.json: it is not a Hugging Face Transformers checkpoint",
                      hint="give a model repo with config.json and *.safetensors weights")


MAX_BASE_CHAIN = 5


def declared_base_models(card_data: object) -> list[str]:
    """The base_model ids a model card declares (none, one or several)."""
    value = getattr(card_data, "base_model", None) if card_data is not None else None
    if isinstance(card_data, dict):
        value = card_data.get("base_model")
    if isinstance(value, str):
        return [value]
    return [v for v in value or [] if isinstance(v, str)]


def base_model_chain(api: HfApi, repo_id: str, card_data: object) -> tuple[str, ...]:
    """Follow the model cards' base_model up the chain (distill -> its base -> ...)."""
    chain: list[str] = []
    current = declared_base_models(card_data)
    while current and len(chain) < MAX_BASE_CHAIN:
        parent = current[0]
        if parent in chain or parent == repo_id:
            break
        chain.append(parent)
        try:
            current = declared_base_models(api.model_info(parent).card_data)
        except HUB_ERRORS:
            break  # a private or deleted base ends the chain; what we have is still right
    return tuple(chain)


def download_model(model: ModelInfo, dest: Path, *, token: str | None) -> Path:
    """Download only the files the converter needs, pinned to the resolved revision."""
    assert model.repo_id is not None
    try:
        # The weights by their exact names (escaped: allow_patterns are fnmatch patterns).
        patterns = [*MODEL_FILE_PATTERNS, *(glob.escape(name) for name in model.weight_files)]
        path = snapshot_download(model.repo_id, revision=model.revision, local_dir=dest,
                                 allow_patterns=patterns, token=token)
    except HUB_ERRORS as err:
        raise hub_error(model.repo_id, err) from None
    return Path(path)
