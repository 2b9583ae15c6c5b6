"""Make small random-weight Hugging Face models that the pinned converter accepts.

Used by the offline demo and the tests: nothing is downloaded. Widths are multiples of
256 so K-quant rows are valid, unless a test asks for an odd width on purpose.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from udquant.workdir import atomic_dir

TOKENIZER_RESOURCE = "demo-tokenizer.model"
VOCAB_SIZE = 1024


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    seed: int = 0
    tie_embeddings: bool = False


HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tiny_model(dest: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny model (safetensors, config, SentencePiece tokenizer) into dest."""
    import torch
    import transformers

    if spec.arch not in HF_CLASSES:
        raise ValueError(f"tiny models exist for {sorted(HF_CLASSES)}, not {spec.arch!r}")
    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[spec.arch])
    config = config_class(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(spec.seed)
    model = model_class(config).to(torch.bfloat16)
    with atomic_dir(dest) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer = resources.files("udquant.data").joinpath(TOKENIZER_RESOURCE).read_bytes()
        (staging / "tokenizer.model").write_bytes(tokenizer)
        (staging / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True,
        }, indent=2))
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--arch", default="llama", choices=sorted(HF_CLASSES))
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie-embeddings", action="store_true")
    args = parser.parse_args(argv)
    spec = TinySpec(arch=args.arch, hidden_size=args.hidden_size,
                    intermediate_size=args.intermediate_size, num_layers=args.layers,
                    seed=args.seed, tie_embeddings=args.tie_embeddings)
    print(make_tiny_model(args.dest, spec))


if __name__ == "__main__":
    main()
