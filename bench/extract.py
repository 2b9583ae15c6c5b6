"""Benchmark: header-only extraction of a large template through the real huggingface_hub client.

A Qwen3.5-27B-sized UD-Q5_K_XL template (real header: 851 tensors, 248,320 tokens; tensor
data a sparse hole of the real size) is served by the local Hub test server. Prints the
bytes fetched against the file size (target < 0.1 %) and the median extraction time.

    python -m bench.extract [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.hubserver import HubServer

SERVER = HubServer().start()
os.environ["HF_ENDPOINT"] = SERVER.url  # before huggingface_hub is imported
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="udquant-bench-hf-")

from gguf import GGMLQuantizationType as T  # noqa: E402
from tests.layouts import qwen35_layout, write_sparse_gguf  # noqa: E402

from udquant.extract import extract_recipe  # noqa: E402
from udquant.gguf_header import TensorInfo  # noqa: E402
from udquant.recipe import is_quantizable, use_more_bits  # noqa: E402
from udquant.template import read_template_remote  # noqa: E402


def ud_types(layout: list[tuple[str, tuple[int, ...], T]]) -> list[tuple[str, tuple[int, ...], T]]:
    typed = []
    for name, shape, dtype in layout:
        if not is_quantizable(TensorInfo(name, shape, dtype, 0)):
            typed.append((name, shape, dtype))
        elif name in ("token_embd.weight", "output.weight"):
            typed.append((name, shape, T.Q8_0))
        elif name.endswith(("attn_qkv.weight", "attn_v.weight", "ffn_down.weight")):
            layer = int(name.split(".")[1])
            typed.append((name, shape, T.Q6_K if use_more_bits(layer, 64) else T.Q5_K))
        else:
            typed.append((name, shape, T.Q5_K))
    return typed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "Qwen3.5-27B-UD-Q5_K_XL.gguf"
        size = write_sparse_gguf(template, ud_types(qwen35_layout()), arch="qwen35", block_count=64, vocab=248320)
        SERVER.state.add_repo("unsloth/Qwen3.5-27B-GGUF", {template.name: template})
        seconds, fetched = [], 0
        for _ in range(args.runs):
            SERVER.state.served.clear()
            start = time.perf_counter()
            layout = read_template_remote("unsloth/Qwen3.5-27B-GGUF", "*UD-Q5_K_XL*")
            document = extract_recipe(layout, recipe_id="qwen35/UD-Q5_K_XL", level="UD-Q5_K_XL")
            seconds.append(time.perf_counter() - start)
            fetched = sum(SERVER.state.served.values())
        print(f"template: {size:,} bytes ({size / 1e9:.1f} GB), {len(layout.tensors)} tensors, "
              f"{len(document['rules'])} rules extracted")
        print(f"bytes fetched: {fetched:,} = {100 * fetched / size:.4f} % of the file (target < 0.1 %)")
        print(f"extraction time: median {statistics.median(seconds):.2f} s over {args.runs} runs "
              f"(header read + parse + compaction + fidelity check)")
    SERVER.stop()


if __name__ == "__main__":
    main()
