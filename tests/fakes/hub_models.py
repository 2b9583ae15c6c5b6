"""Distill repos for the local Hub test server: a config.json and a safetensors file that holds only
its header, so that the Hub metadata (parameter count, tensor names) is that of a real-sized model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tests.hubserver import HubState, Repo


def llama_shapes(layers: int, hidden: int, ffn: int, vocab: int, kv: int) -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden],
              "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": [hidden], p + "post_attention_layernorm.weight": [hidden],
                   p + "self_attn.q_proj.weight": [hidden, hidden], p + "self_attn.k_proj.weight": [kv, hidden],
                   p + "self_attn.v_proj.weight": [kv, hidden], p + "self_attn.o_proj.weight": [hidden, hidden],
                   p + "mlp.gate_proj.weight": [ffn, hidden], p + "mlp.up_proj.weight": [ffn, hidden],
                   p + "mlp.down_proj.weight": [hidden, ffn]}
    return shapes


def safetensors_header_only(shapes: dict[str, list[int]]) -> bytes:
    """A safetensors header describing BF16 tensors; the data section is left out (or sparse, below)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data = json.dumps(header).encode()
    return struct.pack("<Q", len(data)) + data


def add_distill(state: HubState, repo_id: str, *, base_model: str = "meta-llama/Llama-3.1-8B",
                layers: int = 32, hidden: int = 4096, ffn: int = 14336, vocab: int = 128256, kv: int = 1024,
                directory: Path | None = None) -> Repo:
    """An 8B-shaped Llama distill (the defaults) whose card names its base model.

    With a directory, the weights file has its true size there as a sparse file (zeros after the header).
    """
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "hidden_size": hidden, "intermediate_size": ffn, "vocab_size": vocab}
    card = f"---\nbase_model: {base_model}\nlibrary_name: transformers\n---\n# {repo_id}\n"
    shapes = llama_shapes(layers, hidden, ffn, vocab, kv)
    weights: bytes | Path = safetensors_header_only(shapes)
    if directory is not None:
        path = directory / f"{repo_id.replace('/', '--')}.safetensors"
        with path.open("wb") as f:
            f.write(weights)
            f.truncate(len(weights) + sum(2 * _count(shape) for shape in shapes.values()))
        weights = path
    return state.add_repo(repo_id, {
        "config.json": json.dumps(config).encode(), "model.safetensors": weights, "README.md": card.encode(),
    }, card_data={"base_model": base_model, "library_name": "transformers"})


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
