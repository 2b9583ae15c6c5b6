"""Header-only extraction of a template on the Hub, through the real huggingface_hub client."""

from __future__ import annotations

import random
import subprocess

import pytest
import yaml
from gguf import GGMLQuantizationType as T

from tests.e2e.conftest import run_cli
from tests.layouts import qwen35_layout, write_sparse_gguf
from udquant.gguf_header import TensorInfo, read_gguf_header
from udquant.recipe import is_quantizable

pytestmark = pytest.mark.e2e
TWO_MIB = 2 << 20


def ud_like(name: str, shape: tuple[int, ...], dtype: T) -> T:
    if not is_quantizable(TensorInfo(name, shape, dtype, 0)):
        return dtype
    if name in ("token_embd.weight", "output.weight"):
        return T.Q8_0
    if any(role in name for role in ("attn_qkv", "attn_v", "ffn_down")):
        return T.Q6_K if random.Random(name).random() < 0.35 else T.Q5_K
    return T.Q5_K


def test_large_template_is_read_through_its_header_only(hub, tmp_path):
    layout = [(n, s, ud_like(n, s, d)) for n, s, d in qwen35_layout()]
    template = tmp_path / "Qwen3.5-27B-UD-Q5_K_XL.gguf"
    size = write_sparse_gguf(template, layout, arch="qwen35", block_count=64, vocab=248320)
    header_size = read_gguf_header(template, check_data=False).data_offset
    assert header_size > TWO_MIB  # the reader must grow its range at least once
    hub.state.add_repo("unsloth/Qwen3.5-27B-GGUF", {template.name: template, "README.md": b"# template"})
    proc = run_cli("recipe", "extract", "unsloth/Qwen3.5-27B-GGUF", "--file", "*UD-Q5_K_XL*", cwd=tmp_path,
                   program="udquant")
    assert proc.returncode == 0, proc.stderr
    served = hub.state.served[f"unsloth/Qwen3.5-27B-GGUF/{template.name}"]
    assert header_size <= served <= header_size + TWO_MIB
    assert served / size < 0.001
    assert f"bytes of {size:,}" in proc.stderr and "fidelity 100 %" in proc.stderr
    document = yaml.safe_load(proc.stdout)
    assert document["id"] == "qwen35/UD-Q5_K_XL" and document["level"] == "UD-Q5_K_XL"
    assert document["provenance"]["revision"] == hub.state.repos["unsloth/Qwen3.5-27B-GGUF"].sha
    assert document["made_for"]["layers"] == 64


def test_split_template_on_the_hub(hub, toolchain, tmp_path):
    layout = [(n, s, ud_like(n, s, d)) for n, s, d in qwen35_layout(n_layers=8, hidden=256, ffn=512, vocab=1024)]
    whole = tmp_path / "whole.gguf"
    write_sparse_gguf(whole, layout, arch="qwen35", block_count=8, vocab=1024)
    subprocess.run([toolchain.tool("llama-gguf-split"), "--split", "--split-max-tensors", "40", whole,
                    tmp_path / "Tiny-UD-Q5_K_XL"], check=True, capture_output=True)
    shards = sorted(tmp_path.glob("Tiny-UD-Q5_K_XL-*-of-*.gguf"))
    assert len(shards) >= 3
    hub.state.add_repo("unsloth/Tiny-GGUF", {p.name: p for p in shards} | {"Tiny-Q4_K_M.gguf": whole})
    proc = run_cli("recipe", "extract", "unsloth/Tiny-GGUF", "--file", "*UD-Q5_K_XL*", cwd=tmp_path,
                   program="udquant")
    assert proc.returncode == 0, proc.stderr
    assert f"read {len(shards)} header(s)" in proc.stderr
    assert all(hub.state.served[f"unsloth/Tiny-GGUF/{p.name}"] > 0 for p in shards)
    assert "unsloth/Tiny-GGUF/Tiny-Q4_K_M.gguf" not in hub.state.served
    ambiguous = run_cli("recipe", "extract", "unsloth/Tiny-GGUF", "--file", "*.gguf", cwd=tmp_path, program="udquant")
    assert ambiguous.returncode == 2 and "matches several quants" in ambiguous.stderr


def test_missing_template_repo(hub, tmp_path):
    proc = run_cli("recipe", "extract", "nobody/Nothing-GGUF", "--file", "*Q5*", cwd=tmp_path, program="udquant")
    assert proc.returncode == 9 and "does not exist on the Hub" in proc.stderr


def test_refresh_rewrites_changed_recipes_only(hub, tmp_path):
    import shutil

    from udquant.library import recipes_dir

    library = tmp_path / "recipes"
    shutil.copytree(recipes_dir(), library)
    layout = [(n, s, ud_like(n, s, d)) for n, s, d in qwen35_layout(n_layers=8, hidden=256, ffn=512, vocab=1024)]
    template = tmp_path / "Tiny-UD-Q5_K_XL.gguf"
    write_sparse_gguf(template, layout, arch="qwen35", block_count=8, vocab=1024)
    hub.state.add_repo("unsloth/Tiny-GGUF", {template.name: template})
    tracked = tmp_path / "tracked.yaml"
    tracked.write_text("- {recipe: qwen35/UD-Q5_K_XL, repo: unsloth/Tiny-GGUF, file: '*UD-Q5_K_XL*'}\n"
                       "- {recipe: qwen35/UD-Q4_K_XL, repo: unsloth/Gone-GGUF, file: '*UD-Q4_K_XL*'}\n")
    env = {"UDQUANT_RECIPES_DIR": str(library)}
    first = run_cli("recipe", "refresh", "--tracked", tracked, cwd=tmp_path, env=env, program="udquant")
    assert first.returncode == 0, first.stderr
    assert "updated   qwen35/UD-Q5_K_XL" in first.stdout and "failed    qwen35/UD-Q4_K_XL" in first.stdout
    document = yaml.safe_load((library / "qwen35" / "UD-Q5_K_XL.yaml").read_text())
    assert document["provenance"]["kind"] == "template"
    assert document["provenance"]["revision"] == hub.state.repos["unsloth/Tiny-GGUF"].sha
    again = run_cli("recipe", "refresh", "--tracked", tracked, cwd=tmp_path, env=env, program="udquant")
    assert "unchanged qwen35/UD-Q5_K_XL" in again.stdout
    untouched = "qwen35/UD-Q4_K_XL.yaml"
    assert (library / untouched).read_text() == (recipes_dir() / untouched).read_text()
