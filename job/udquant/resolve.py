"""Resolve what the user named (a Hub repo id or a local directory) into a described model."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from udquant.errors import InputError, UnsupportedArchitectureError
from udquant.library import recipes_dir

# Hub repo ids: "owner/name", letters, digits, '-', '_', '.', at most 96 characters each.
REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MTP_CONFIG_KEYS = ("mtp_num_hidden_layers", "num_nextn_predict_layers")
MTP_WEIGHT_MARKERS = ("mtp.", ".mtp_", "nextn")


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
    declared_mtp_layers: int
    base_models: tuple[str, ...] = ()  # the card's base_model chain, nearest first
    vocab_size: int = 0  # from config.json; 0 when it does not say

    @property
    def mtp_weights_present(self) -> bool:
        return any(marker in name for name in self.weight_names for marker in MTP_WEIGHT_MARKERS)

    @property
    def needs_no_mtp(self) -> bool:
        """The config declares MTP layers that the checkpoint does not carry (common in distills)."""
        return self.declared_mtp_layers > 0 and not self.mtp_weights_present


def supported_architectures() -> dict[str, str]:
    data = yaml.safe_load((recipes_dir() / "architectures.yaml").read_text())
    return {str(k): str(v) for k, v in data.items()}


def validate_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id) or repo_id.endswith(".git"):
        raise InputError(
            f"{repo_id!r} is neither an existing directory nor a Hugging Face repo id",
            hint="write it as owner/name (letters, digits, '-', '_', '.'), or give an existing local directory")
    return repo_id


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists()


def read_safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header (8-byte length, then JSON)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError("header too large")
            header: dict[str, Any] = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from None
    return {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"}


def describe_config(config: dict[str, Any], source: str) -> tuple[str, str, int]:
    """(HF architecture, llama.cpp architecture, declared MTP layers) from a config.json."""
    architectures = config.get("architectures") or []
    if not architectures:
        raise InputError(f"{source}: config.json names no architecture ('architectures' is missing)")
    hf_arch = architectures[0]
    supported = supported_architectures()
    if hf_arch not in supported:
        raise UnsupportedArchitectureError(hf_arch, sorted(supported))
    text_config = config.get("text_config") or {}
    declared = max(int(c.get(key) or 0) for c in (config, text_config) for key in MTP_CONFIG_KEYS)
    return hf_arch, supported[hf_arch], declared


def config_vocab_size(config: dict[str, Any]) -> int:
    """The vocabulary size config.json declares (multimodal configs keep it in text_config), or 0."""
    text_config = config.get("text_config") or {}
    value = config.get("vocab_size") or text_config.get("vocab_size") or 0
    return int(value) if isinstance(value, int) else 0


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
        source=source, name=directory.resolve().name, repo_id=None, revision=None,
        local_dir=directory.resolve(), hf_architecture=hf_arch, llama_arch=llama_arch,
        n_params=n_params, weights_bytes=sum(p.stat().st_size for p in weights),
        weight_names=tuple(sorted(shapes)), declared_mtp_layers=declared_mtp,
        vocab_size=config_vocab_size(config))


def resolve_model(source: str, *, revision: str | None = None, token: str | None = None) -> ModelInfo:
    """Describe the model named by source: a local directory or owner/name on the Hub."""
    if looks_like_path(source):
        return resolve_local(Path(source).expanduser(), source)
    from udquant.hub import resolve_hub_model

    return resolve_hub_model(validate_repo_id(source), revision=revision, token=token)
