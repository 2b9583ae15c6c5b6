"""What udquant-job needs to start for real without llama.cpp: a toolchain folder whose converter is a given
Python script (the other tools are empty files), and a local model folder small enough to resolve at once."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fakes.hub_models import safetensors_header_only
from udquant.toolchain import PINNED_TAG, TOOLS


def fake_toolchain(root: Path, converter: str) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "src" / "convert_hf_to_gguf.py").write_text(converter)
    for tool in TOOLS:
        (root / "bin" / tool).touch(mode=0o755)
    (root / "toolchain.json").write_text(json.dumps({"tag": PINNED_TAG, "backend": "cpu"}))
    return root


def tiny_llama_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 8, "vocab_size": 16}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(safetensors_header_only({"model.embed_tokens.weight": [16, 8]})
                                               + b"\0" * 256)
    return folder
