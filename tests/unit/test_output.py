"""Where the job writes: output folders it must not take over, the disk it needs for the upload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from udquant.errors import InputError
from udquant.job import _estimate_bytes
from udquant.output import check_out_dir, kept_levels, kept_mmproj
from udquant.recipe import find_recipe
from udquant.resolve import ModelInfo


def model(local_dir: Path | None = None, weight_names: tuple[str, ...] = (), n_params: int = 1000) -> ModelInfo:
    return ModelInfo(source="o/M", name="M", repo_id=None if local_dir else "o/M", revision=None,
                     local_dir=local_dir, hf_architecture="LlamaForCausalLM", llama_arch="llama",
                     n_params=n_params, weights_bytes=2 * n_params, weight_names=weight_names,
                     declared_mtp_layers=0)


def test_an_out_dir_inside_the_model_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="is inside the model folder"):
        check_out_dir(tmp_path / "quants", model(local_dir=tmp_path))
    check_out_dir(tmp_path.parent / "elsewhere", model(local_dir=tmp_path))


def test_a_card_or_results_udquant_did_not_write_for_this_model_are_never_replaced(tmp_path):
    (tmp_path / "README.md").write_text("# My precious model card\n")
    with pytest.raises(InputError, match="README.md was not written by udquant"):
        check_out_dir(tmp_path, model())
    (tmp_path / "README.md").write_text("---\nquantized_by: udquant\n---\n# M UD GGUF\n")
    check_out_dir(tmp_path, model())  # udquant's own card: a rerun replaces it
    (tmp_path / "udquant-result.json").write_text(json.dumps({"inputs": {"source": "other/M"}}))
    with pytest.raises(InputError, match="holds udquant's results for other/M, not for o/M"):
        check_out_dir(tmp_path, model())
    (tmp_path / "udquant-result.json").write_text(json.dumps({"inputs": {"source": "o/M"}}))
    check_out_dir(tmp_path, model())


def test_the_disk_estimate_counts_the_split_copy_of_large_levels():
    big = model(n_params=70_000_000_000)
    recipes = [find_recipe("UD-Q5_K_XL", "llama"), find_recipe("UD-Q4_K_XL", "llama")]
    whole = _estimate_bytes(big, recipes, True)
    level_bytes = [big.n_params * (bits + 1) / 8 for bits in (5.5, 4.5)]  # q5_K and q4_K catch-alls
    assert _estimate_bytes(big, recipes, True, split_bytes=50 * 10**9) == int(whole + level_bytes[0])  # Q5 only
    assert _estimate_bytes(big, recipes, True, split_bytes=45 * 10**9) == int(whole + sum(level_bytes))
    assert _estimate_bytes(big, recipes, True, split_bytes=10**12) == whole


def test_levels_published_before_stay_only_while_their_files_do():
    previous = {"created_at": "2026-11-01T00:00:00Z", "llama_cpp": {"tag": "b11434"}, "imatrix": {"source": "hub"},
                "levels": [{"level": "UD-Q5_K_XL", "file": "M-UD-Q5_K_XL.gguf"},
                           {"level": "UD-Q4_K_XL", "file": "M-UD-Q4_K_XL.gguf",
                            "parts": ["M-UD-Q4_K_XL-00001-of-00002.gguf", "M-UD-Q4_K_XL-00002-of-00002.gguf"]}]}
    remote = frozenset({"M-UD-Q5_K_XL.gguf", "M-UD-Q4_K_XL-00001-of-00002.gguf"})
    kept = kept_levels(previous, remote, {"UD-Q3_K_XL"})
    assert [lv["level"] for lv in kept] == ["UD-Q5_K_XL"]  # a shard of Q4 is gone
    assert kept[0]["kept_from"] == {"created_at": "2026-11-01T00:00:00Z", "llama_cpp": "b11434", "imatrix": "hub"}
    assert kept_levels(previous, remote, {"UD-Q5_K_XL"}) == []  # made again: not kept


def test_an_mmproj_published_before_is_kept_only_while_its_file_is_there():
    previous = {"created_at": "2026-11-01T00:00:00Z", "llama_cpp": {"tag": "b11434"}, "imatrix": {"source": "none"},
                "mmproj": {"file": "mmproj-M-F16.gguf", "size": 10, "sha256": "a" * 64, "type": "f16"}}
    kept = kept_mmproj(previous, frozenset({"mmproj-M-F16.gguf"}))
    assert kept is not None and kept["file"] == "mmproj-M-F16.gguf"
    assert kept["kept_from"] == {"created_at": "2026-11-01T00:00:00Z", "llama_cpp": "b11434", "imatrix": "none"}
    # Kept twice: the run that made it is still the one named.
    assert kept_mmproj(previous | {"created_at": "later", "mmproj": kept}, frozenset({"mmproj-M-F16.gguf"})) == kept
    assert kept_mmproj(previous, frozenset()) is None
    assert kept_mmproj(previous | {"mmproj": None}, frozenset({"mmproj-M-F16.gguf"})) is None
    assert kept_mmproj(None, frozenset({"mmproj-M-F16.gguf"})) is None


def test_vision_tower_weights_are_found():
    names = ("model.language_model.layers.0.mlp.down_proj.weight", "model.visual.blocks.0.attn.qkv.weight")
    assert model(weight_names=names).vision_weights == ("model.visual.blocks.0.attn.qkv.weight",)
    assert model(weight_names=names[:1]).vision_weights == ()


def test_a_given_imatrix_path_shows_only_its_file_name(tmp_path):
    from udquant.imatrix import Imatrix
    from udquant.output import ImatrixUse

    path = tmp_path / "mine.imatrix.gguf"
    path.write_bytes(b"x")
    imatrix = Imatrix(path, "gguf", {}, ("/home/me/private/calib.txt", "C:\\Users\\me\\c.txt", "wiki"), 4, 512, {})
    assert ImatrixUse("file", imatrix).describe()["datasets"] == ["calib.txt", "c.txt", "wiki"]
