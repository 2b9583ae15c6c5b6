"""Resolve what the user named (a Hub repo id or a local directory) into a described model."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from udquant.errors import InputError, UnsupportedArchitectureError
from udquant.library import recipes_dir

# Hub repo ids: "owner/name", letters, digits, '-', '_', '.', at most 96 characters each, each part
# ending in a letter, digit or '_' (the Hub's \b), no "--" or "..". Used with fullmatch.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?!.*(--|\.\.)){_REPO_PART}/{_REPO_PART}")
MTP_CONFIG_KEYS = ("mtp_num_hidden_layers", "num_nextn_predict_layers")
MTP_WEIGHT_MARKERS = ("mtp.", ".mtp_", "nextn")
VISION_WEIGHT_MARKERS = ("visual.", "vision_tower.", "vision_model.", "multi_modal_projector.")
# The architectures whose class in the pinned converter has Qwen's MTP wiring (_QwenMtpMixin in
# conversion/qwen.py), the only ones of ours it takes --no-mtp for. Without --no-mtp it adds
# mtp_num_hidden_layers blocks or, when the config says none (or 0), as many as the
# mtp.layers.<i>.* weights hold, and fails (assert self.opt_num_mtp_layers != 0) if they hold none.
MTP_ARCHITECTURES = frozenset({"Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"})
# The converter first drops "language_model." from names (model.language_model.mtp... in multimodal ones).
_MTP_LAYER_WEIGHT = re.compile(r"(?:model\.)?mtp\.layers\.\d+\.")


@dataclass(frozen=True)
class ModelInfo:
    """Everything later stages need to know about the source model."""

    source: str
    name: str
    repo_id: str | None
    revision: str | None
    local_dir: Path | None
    hf_architecture: str
    llama_arch: str
    n_params: int
    weights_bytes: int
    weight_names: tuple[str, ...]
    declared_mtp_layers: int  # what config.json declares (mtp_num_hidden_layers, num_nextn_predict_layers)
    base_models: tuple[str, ...] = ()  # the card's base_model chain, nearest first
    vocab_size: int = 0  # from config.json; 0 when it does not say
    license: tuple[tuple[str, str], ...] = ()  # the card's license, license_name, license_link
    # The top-level weight files (and index) the converter reads: what a Hub download fetches.
    weight_files: tuple[str, ...] = ()

    @property
    def mtp_weights_present(self) -> bool:
        return any(marker in name for name in self.weight_names for marker in MTP_WEIGHT_MARKERS)

    @property
    def vision_weights(self) -> tuple[str, ...]:
        """The vision tower's weights: the converter leaves them out of the text model's GGUF."""
        return tuple(name for name in self.weight_names if any(marker in name for marker in VISION_WEIGHT_MARKERS))

    @property
    def supports_mtp(self) -> bool:
        """Whether the pinned converter handles MTP layers (and so takes --no-mtp) for this architecture."""
        return self.hf_architecture in MTP_ARCHITECTURES

    @property
    def needs_no_mtp(self) -> bool:
        """The converter must be told --no-mtp: the config declares MTP layers the checkpoint does not
        carry (common in distills), or declares none and the weights hold no MTP layer either."""
        if not self.supports_mtp:
            return False
        if self.declared_mtp_layers > 0:
            return not self.mtp_weights_present
        return not any(_MTP_LAYER_WEIGHT.match(name.replace("language_model.", "")) for name in self.weight_names)


LICENSE_KEYS = ("license", "license_name", "license_link")


def card_license(data: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """The license keys a model card's metadata sets (a quant must carry them along)."""
    data = data or {}
    return tuple((key, str(data[key])) for key in LICENSE_KEYS if isinstance(data.get(key), str) and data[key])


def check_mtp_option(model: ModelInfo, no_mtp: bool | None) -> None:
    """Refuse --no-mtp and --mtp where the pinned converter has no MTP handling for the architecture
    (it refuses --no-mtp, and --mtp would change nothing)."""
    if no_mtp is not None and not model.supports_mtp:
        option = "--no-mtp" if no_mtp else "--mtp"
        raise InputError(f"{option} does not apply to {model.hf_architecture}: the pinned converter has no MTP "
                         "layers to keep or drop for it",
                         hint=f"leave out {option}; MTP layers exist in {', '.join(sorted(MTP_ARCHITECTURES))}")


def supported_architectures() -> dict[str, str]:
    data = yaml.safe_load((recipes_dir() / "architectures.yaml").read_text())
    return {str(k): str(v) for k, v in data.items()}


def validate_repo_id(repo_id: str, option: str | None = None) -> str:
    """repo_id when it is one; option names where an output repo was given (a source may also be a folder)."""
    if not REPO_ID.fullmatch(repo_id) or repo_id.endswith(".git"):
        if option is not None:
            raise InputError(f"{option} {repo_id!r} is not a Hugging Face repo id",
                             hint="write it as owner/name (letters, digits, '-', '_', '.')")
        raise InputError(
            f"{repo_id!r} is neither an existing directory nor a Hugging Face repo id",
            hint="write it as owner/name (letters, digits, '-', '_', '.'), or give an existing local directory")
    return repo_id


def looks_like_path(source: str) -> bool:
    try:
        return source.startswith((".", "/", "~")) or Path(source).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL: no folder, maybe no repo id
        return False


def _whole_numbers(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)


def read_safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header (8-byte length, then JSON), once the file is
    known to hold all the data the header describes."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
        size = path.stat().st_size
    except (OSError, ValueError, struct.error) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    shapes: dict[str, list[int]] = {}
    data_end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        entry: dict[str, Any] = meta if isinstance(meta, dict) else {}
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not _whole_numbers(shape) or not _whole_numbers(offsets) or len(offsets) != 2:
            raise InputError(f"{path}: the safetensors header's entry for {name!r} needs 'shape' and "
                             "'data_offsets' as lists of whole numbers", hint="download the file again")
        shapes[name] = shape
        data_end = max(data_end, offsets[1])
    if size < 8 + length + data_end:
        raise InputError(f"{path}: truncated: {size:,} bytes, its header describes {8 + length + data_end:,}",
                         hint="the download or copy was cut short: download the file again")
    return shapes


def _declared_layers(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"{where}: {key} must be a whole number of layers, not {value!r}")
    return value


def describe_config(config: Any, source: str) -> tuple[str, str, int]:
    """(HF architecture, llama.cpp architecture, declared MTP layers) from a config.json."""
    if not isinstance(config, dict):
        raise InputError(f"{source}: config.json is not a JSON object but a {type(config).__name__}")
    architectures = config.get("architectures") or []
    if not architectures:
        raise InputError(f"{source}: config.json names no architecture ('architectures' is missing)")
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise InputError(f"{source}: config.json: 'architectures' must be a list of class names, "
                         f"not {architectures!r}", hint='write it as ["LlamaForCausalLM"]')
    hf_arch = architectures[0]
    supported = supported_architectures()
    if hf_arch not in supported:
        raise UnsupportedArchitectureError(hf_arch, sorted(supported))
    text_config = config.get("text_config") or {}
    if not isinstance(text_config, dict):
        raise InputError(f"{source}: config.json: 'text_config' must be a JSON object, not {text_config!r}")
    declared = max(_declared_layers(c, key, f"{source}: config.json{where}")
                   for c, where in ((config, ""), (text_config, ": text_config")) for key in MTP_CONFIG_KEYS)
    return hf_arch, supported[hf_arch], declared


def config_vocab_size(config: dict[str, Any]) -> int:
    """The vocabulary size config.json declares (multimodal configs keep it in text_config), or 0."""
    text_config = config.get("text_config") or {}
    value = config.get("vocab_size") or text_config.get("vocab_size") or 0
    return int(value) if isinstance(value, int) else 0


def local_model_name(directory: Path) -> str:
    """The name the user gave the folder: a symlink's own name, not its target's; for a snapshot in the
    Hugging Face cache (models--owner--Name/snapshots/<commit>), the repo's name, not the commit."""
    path = Path(os.path.abspath(directory))  # ".." and "." made plain, symlinks kept
    repo_folder = path.parent.parent.name
    if path.parent.name == "snapshots" and repo_folder.startswith("models--") and repo_folder.count("--") >= 2:
        return repo_folder.split("--")[-1]
    return path.name


def resolve_local(directory: Path, source: str) -> ModelInfo:
    if not directory.is_dir():
        raise InputError(f"{source}: no such directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InputError(f"{source}: no config.json in {directory}",
                         hint="point at a Hugging Face model folder (config.json + *.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise InputError(f"{config_path}: not valid JSON ({err})") from None
    hf_arch, llama_arch, declared_mtp = describe_config(config, source)
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        found = ", ".join(sorted(p.name for p in directory.glob("*.bin")) or ["nothing"])
        raise InputError(f"{source}: no *.safetensors weights in {directory} (found {found})",
                         hint="udquant converts safetensors checkpoints only")
    shapes: dict[str, list[int]] = {}
    for path in weights:
        shapes.update(read_safetensors_shapes(path))
    n_params = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        n_params += count
    return ModelInfo(
        source=source, name=local_model_name(directory), repo_id=None, revision=None,
        local_dir=directory.resolve(), hf_architecture=hf_arch, llama_arch=llama_arch,
        n_params=n_params, weights_bytes=sum(p.stat().st_size for p in weights),
        weight_files=tuple(p.name for p in weights),
        weight_names=tuple(sorted(shapes)), declared_mtp_layers=declared_mtp,
        vocab_size=config_vocab_size(config), license=_local_card_license(directory))


def _local_card_license(directory: Path) -> tuple[tuple[str, str], ...]:
    card = directory / "README.md"
    if not card.is_file():
        return ()
    from huggingface_hub import ModelCard

    try:
        return card_license(ModelCard.load(card).data.to_dict())
    except (ValueError, yaml.YAMLError, OSError):
        return ()  # a card whose metadata cannot be read names no license


def resolve_model(source: str, *, revision: str | None = None, token: str | None = None) -> ModelInfo:
    """Describe the model named by source: a local directory or owner/name on the Hub."""
    if looks_like_path(source):
        try:
            directory = Path(source).expanduser()
        except RuntimeError:  # ~name of no user on this machine
            user = source[1:].split("/", 1)[0]
            raise InputError(f"{source}: no such directory ('~{user}' names no user of this machine)",
                             hint="give the folder's full path") from None
        return resolve_local(directory, source)
    from udquant.hub import resolve_hub_model

    return resolve_hub_model(validate_repo_id(source), revision=revision, token=token)
