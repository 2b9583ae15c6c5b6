"""Model layouts for tests, made in code: the same tensor kinds, shapes and dtypes as the
BF16 conversions of real models, without their weights."""

from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType as T

from udquant.gguf_header import GGUFHeader, TensorInfo

BF16, F32 = T.BF16, T.F32


def qwen35_layout(n_layers: int = 64, hidden: int = 5120, ffn: int = 17408, vocab: int = 248320,
                  full_attention_interval: int = 4, tied: bool = False) -> list[tuple[str, tuple[int, ...], T]]:
    """The qwen35 hybrid layout (Gated DeltaNet layers, full attention every 4th layer).

    With the defaults it is Qwen3.5-27B's: 851 tensors, 498 of them BF16.
    """
    tensors: list[tuple[str, tuple[int, ...], T]] = [("token_embd.weight", (hidden, vocab), BF16)]
    if not tied:
        tensors.append(("output.weight", (hidden, vocab), BF16))
    tensors.append(("output_norm.weight", (hidden,), F32))
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (hidden,), F32),
                    (p + "post_attention_norm.weight", (hidden,), F32),
                    (p + "ffn_down.weight", (ffn, hidden), BF16), (p + "ffn_gate.weight", (hidden, ffn), BF16),
                    (p + "ffn_up.weight", (hidden, ffn), BF16)]
        if (i + 1) % full_attention_interval == 0:
            tensors += [(p + "attn_q.weight", (hidden, 12288), BF16), (p + "attn_k.weight", (hidden, 1024), BF16),
                        (p + "attn_v.weight", (hidden, 1024), BF16), (p + "attn_output.weight", (6144, hidden), BF16),
                        (p + "attn_q_norm.weight", (256,), F32), (p + "attn_k_norm.weight", (256,), F32)]
        else:
            tensors += [(p + "attn_qkv.weight", (hidden, 10240), BF16), (p + "attn_gate.weight", (hidden, 6144), BF16),
                        (p + "ssm_alpha.weight", (hidden, 48), BF16), (p + "ssm_beta.weight", (hidden, 48), BF16),
                        (p + "ssm_out.weight", (6144, hidden), BF16), (p + "ssm_conv1d.weight", (4, 10240), F32),
                        (p + "ssm_a", (48,), F32), (p + "ssm_dt.bias", (48,), F32),
                        (p + "ssm_norm.weight", (128,), F32)]
    return tensors


def llama_layout(n_layers: int = 4, hidden: int = 256, ffn: int = 512, vocab: int = 1024,
                 kv: int = 128) -> list[tuple[str, tuple[int, ...], T]]:
    tensors: list[tuple[str, tuple[int, ...], T]] = [
        ("token_embd.weight", (hidden, vocab), BF16), ("output.weight", (hidden, vocab), BF16),
        ("output_norm.weight", (hidden,), F32)]
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (hidden,), F32), (p + "ffn_norm.weight", (hidden,), F32),
                    (p + "attn_q.weight", (hidden, hidden), BF16), (p + "attn_k.weight", (hidden, kv), BF16),
                    (p + "attn_v.weight", (hidden, kv), BF16), (p + "attn_output.weight", (hidden, hidden), BF16),
                    (p + "ffn_down.weight", (ffn, hidden), BF16), (p + "ffn_gate.weight", (hidden, ffn), BF16),
                    (p + "ffn_up.weight", (hidden, ffn), BF16)]
    return tensors


def header_of(layout: list[tuple[str, tuple[int, ...], T]]) -> GGUFHeader:
    tensors = tuple(TensorInfo(name, shape, dtype, 0) for name, shape, dtype in layout)
    return GGUFHeader(3, {"general.architecture": "test"}, tensors, 0, 32)


def write_sparse_gguf(path: Path, layout: list[tuple[str, tuple[int, ...], T]], *, arch: str, block_count: int,
                      vocab: int, file_type: int = 17) -> int:
    """A GGUF whose header is real (metadata, a vocab-sized token list, every tensor) and whose
    tensor data is a hole of the real size: a large template that costs no disk. Returns its size."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFWriter

    from udquant.gguf_header import read_gguf_header

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(block_count)
    writer.add_file_type(file_type)
    writer.add_token_list([f"token-{i:06d}" for i in range(vocab)])
    for name, shape, dtype in layout:
        block, size = GGML_QUANT_SIZES[dtype]
        count = 1
        for dim in shape:
            count *= dim
        writer.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), count // block * size,
                               raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = read_gguf_header(path, check_data=False)
    total = header.data_offset + header.data_size
    with open(path, "r+b") as f:
        f.truncate(total)
    return total
