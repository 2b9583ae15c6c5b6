"""The target architecture for real: a tiny qwen35 (Gated DeltaNet + attention) with the real
Qwen3.5 tokenizer, tied embeddings, and a config that declares an MTP layer the weights lack."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import FAST_IMATRIX, run_cli
from udquant.convert import check_mmproj_pair, convert_to_gguf, export_mmproj
from udquant.errors import ToolError
from udquant.gguf_header import read_gguf_header
from udquant.imatrix import read_imatrix
from udquant.library import data_file
from udquant.tiny_qwen35 import make_tiny_qwen35

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory) -> Path:
    return make_tiny_qwen35(tmp_path_factory.mktemp("q35") / "tiny-qwen35-distill", num_layers=4)


def test_qwen35_distill_end_to_end(qwen35, toolchain, tmp_path):
    proc = run_cli(qwen35, "--work-dir", tmp_path / "work", "--out-dir", tmp_path / "out", *FAST_IMATRIX,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "MTP layer(s) the weights lack: converting with --no-mtp" in proc.stderr
    out = tmp_path / "out"
    result = json.loads((out / "udquant-result.json").read_text())
    assert result["inputs"]["llama_arch"] == "qwen35" and result["inputs"]["no_mtp"] is True
    gguf = out / result["levels"][0]["file"]
    header = read_gguf_header(gguf)
    assert header.metadata["tokenizer.ggml.pre"] == "qwen35"
    assert header.metadata["qwen35.block_count"] == 4
    types = {t.name: t.type_name for t in header.tensors}
    assert "output.weight" not in types  # tied: token_embd carries the output rule
    assert types["token_embd.weight"] == "q8_0"
    # attn_qkv (DeltaNet layers) and attn_v (layer 3) share llama.cpp's attention counter.
    assert [types.get(f"blk.{i}.attn_qkv.weight") or types[f"blk.{i}.attn_v.weight"] for i in range(4)] == [
        "q5_K", "q5_K", "q6_K", "q6_K"]
    assert types["blk.0.ssm_conv1d.weight"] == "f32"
    # It loads and runs in llama.cpp.
    run = subprocess.run([toolchain.tool("llama-perplexity"), "-m", gguf, "-f", data_file("eval.txt"), "-c", "128",
                          "--chunks", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.fixture(scope="module")
def qwen35_mtp(tmp_path_factory) -> Path:
    return make_tiny_qwen35(tmp_path_factory.mktemp("q35-mtp") / "tiny-qwen35-mtp", num_layers=4, mtp_weights=True)


def test_mtp_layers_are_kept_and_get_imatrix_data(qwen35_mtp, tmp_path):
    """A checkpoint with its MTP block: converted with it, and llama-imatrix (with --nextn) collects data
    for it, so llama-quantize finds importance data for every MTP tensor it quantizes."""
    work = tmp_path / "work"
    proc = run_cli(qwen35_mtp, "--work-dir", work, "--out-dir", tmp_path / "out", *FAST_IMATRIX, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "udquant-result.json").read_text())
    assert result["inputs"]["no_mtp"] is False
    header = read_gguf_header(tmp_path / "out" / result["levels"][0]["file"])
    assert (header.metadata["qwen35.block_count"], header.metadata["qwen35.nextn_predict_layers"]) == (5, 1)
    mtp = {t.name for t in header.tensors if t.name.startswith("blk.4.") and t.type_name != "f32"}
    assert "blk.4.nextn.eh_proj.weight" in mtp and "blk.4.attn_q.weight" in mtp
    (imatrix,) = work.glob("imatrix-*/imatrix.gguf")
    assert mtp <= set(read_imatrix(imatrix).widths)
    (quantize_log,) = work.glob("quantize-*/quantize.log")
    assert "did not find weights for blk." not in quantize_log.read_text()


@pytest.fixture(scope="module")
def qwen35_undeclared(tmp_path_factory) -> Path:
    # No mtp_num_hidden_layers in config.json and no MTP weights: the pinned converter then counts
    # MTP layers from the weights and fails its assert unless given --no-mtp.
    return make_tiny_qwen35(tmp_path_factory.mktemp("q35-undeclared") / "tiny-qwen35-nodecl", num_layers=4,
                            declare_mtp=False)


def test_qwen35_without_declared_mtp_converts_with_no_mtp(qwen35_undeclared, toolchain, tmp_path):
    assert "mtp_num_hidden_layers" not in json.loads((qwen35_undeclared / "config.json").read_text())
    proc = run_cli(qwen35_undeclared, "--work-dir", tmp_path / "work", "--out-dir", tmp_path / "out",
                   "--imatrix", "none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "udquant-result.json").read_text())
    assert result["inputs"]["no_mtp"] is True
    header = read_gguf_header(tmp_path / "out" / result["levels"][0]["file"])
    assert header.metadata["qwen35.block_count"] == 4 and "qwen35.nextn_predict_layers" not in header.metadata


def test_keeping_mtp_the_checkpoint_lacks_fails_with_a_true_hint(qwen35_undeclared, toolchain, tmp_path):
    proc = run_cli(qwen35_undeclared, "--mtp", "--work-dir", tmp_path / "work", "--out-dir", tmp_path / "out",
                   "--imatrix", "none", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "assert self.opt_num_mtp_layers != 0" in proc.stderr
    assert "declares no mtp_num_hidden_layers and its weights hold no mtp.layers.* tensors" in proc.stderr
    assert "rerun with --no-mtp" in proc.stderr


@pytest.fixture(scope="module")
def qwen35_vision(tmp_path_factory) -> Path:
    return make_tiny_qwen35(tmp_path_factory.mktemp("q35-vision") / "tiny-qwen35-vl", num_layers=4, vision=True)


def test_a_vision_tower_becomes_an_mmproj_file_next_to_the_quants(qwen35_vision, toolchain, tmp_path):
    args = [qwen35_vision, "--work-dir", tmp_path / "work", "--imatrix", "none"]
    proc = run_cli(*args, "--out-dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    result = json.loads((out / "udquant-result.json").read_text())
    mmproj = out / "mmproj-tiny-qwen35-vl-F16.gguf"
    assert result["mmproj"]["file"] == mmproj.name and result["mmproj"]["size"] == mmproj.stat().st_size
    header = read_gguf_header(mmproj)
    assert header.metadata["general.type"] == "mmproj" and header.metadata["clip.has_vision_encoder"] is True
    names = {t.name for t in header.tensors}
    assert "v.patch_embd.weight" in names and "v.blk.1.attn_qkv.weight" in names
    assert all(name.startswith(("v.", "mm.")) for name in names)
    # The text model holds none of the vision tower.
    text = read_gguf_header(out / result["levels"][0]["file"])
    assert not any(t.name.startswith(("v.", "mm.")) for t in text.tensors)
    card = (out / "README.md").read_text()
    assert f"| vision | `{mmproj.name}` |" in card and "Text only" not in card
    # Before it was published, llama-mtmd-cli loaded the pair and ran an image through both.
    assert "mmproj-check" in result["timings"]
    assert "mtmd batch encoding done" in (tmp_path / "work" / "logs" / "tiny-qwen35-vl-mmproj-check.log").read_text()

    proc = run_cli(*args, "--out-dir", tmp_path / "text-only", "--no-mmproj", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--no-mmproj, so only the text model is published" in proc.stderr
    assert not list((tmp_path / "text-only").glob("mmproj-*"))
    card = (tmp_path / "text-only" / "README.md").read_text()
    assert "Text only: the source's vision tower is not in these files" in card


def test_an_mmproj_published_before_stays_described_when_a_rerun_makes_none(qwen35_vision, hub, tmp_path):
    files = {p.name: p for p in qwen35_vision.iterdir() if p.is_file()}
    hub.state.add_repo("someone/Tiny-VL", files, card_data={"license": "apache-2.0"})
    args = ["someone/Tiny-VL", "--work-dir", tmp_path / "work", "--imatrix", "none"]
    env = {"HF_TOKEN": "hf_test_token_owner"}
    proc = run_cli(*args, "--out-dir", tmp_path / "first", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    repo = hub.state.repos["tester/Tiny-VL-UD-GGUF"]
    mmproj = "mmproj-Tiny-VL-F16.gguf"
    assert mmproj in repo.files

    proc = run_cli(*args, "--out-dir", tmp_path / "again", "--no-mmproj", "--quant", "UD-Q4_K_XL",
                   cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert mmproj in repo.files and len(repo.commits) == 2
    first = json.loads((tmp_path / "first" / "udquant-result.json").read_text())
    result = json.loads(repo.files["udquant-result.json"].data)
    assert result["mmproj"]["file"] == mmproj and result["mmproj"]["sha256"] == first["mmproj"]["sha256"]
    assert result["mmproj"]["kept_from"]["created_at"] == first["created_at"]
    card = repo.files["README.md"].data.decode()
    assert f"| vision | `{mmproj}` |" in card and "kept from an earlier run" in card
    assert "Text only" not in card


def test_an_mmproj_that_does_not_fit_the_text_model_stops_the_job(qwen35_vision, odd_llama, toolchain, tmp_path):
    mmproj = export_mmproj(toolchain, qwen35_vision, tmp_path / "mmproj.gguf", model_name="vl",
                           log_path=tmp_path / "mmproj.log")
    text = convert_to_gguf(toolchain, odd_llama, tmp_path / "odd.gguf", no_mtp=False, model_name="odd",
                           log_path=tmp_path / "convert.log")  # 320 wide; the projector writes 256
    with pytest.raises(ToolError) as err:
        check_mmproj_pair(toolchain, text, mmproj, image=data_file("vision-check.png"), log_path=tmp_path / "check.log")
    assert err.value.tool == "llama-mtmd-cli" and err.value.returncode == 1
    assert err.value.hint == "the vision projector's output width is not the text model's embedding width"
