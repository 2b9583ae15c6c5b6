"""Where the job writes: output folders it must not take over, the disk it needs for the upload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from udquant.errors import InputError
from udquant.job import _estimate_bytes
from udquant.out_dir import check_out_dir, output_file_names
from udquant.output import ImatrixUse, LevelOutput, kept_levels, kept_mmproj, write_outputs
from udquant.recipe import find_recipe
from udquant.resolve import ModelInfo
from udquant.toolchain import Toolchain
from udquant.verify import Verification


def model(local_dir: Path | None = None, weight_names: tuple[str, ...] = (), n_params: int = 1000) -> ModelInfo:
    return ModelInfo(source="o/M", name="M", repo_id=None if local_dir else "o/M", revision=None,
                     local_dir=local_dir, hf_architecture="LlamaForCausalLM", llama_arch="llama",
                     n_params=n_params, weights_bytes=2 * n_params, weight_names=weight_names,
                     declared_mtp_layers=0)


def test_an_out_dir_inside_the_model_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="is inside the model folder"):
        check_out_dir(tmp_path / "model" / "quants", model(local_dir=tmp_path / "model"))
    check_out_dir(tmp_path / "elsewhere", model(local_dir=tmp_path / "model"))


def test_a_card_or_results_udquant_did_not_write_for_this_model_are_never_replaced(tmp_path):
    (tmp_path / "README.md").write_text("# My precious model card\n")
    with pytest.raises(InputError, match="README.md was not written by udquant"):
        check_out_dir(tmp_path, model())
    (tmp_path / "README.md").write_text("---\nquantized_by: udquant\n---\n# M UD GGUF\n")
    check_out_dir(tmp_path, model())  # udquant's own card: a rerun replaces it
    (tmp_path / "udquant-result.json").write_text(json.dumps(result_json("other/M")))
    with pytest.raises(InputError, match="holds udquant's results for other/M, not for o/M"):
        check_out_dir(tmp_path, model())
    (tmp_path / "udquant-result.json").write_text(json.dumps(result_json("o/M")))
    check_out_dir(tmp_path, model())


def result_json(source: str, levels: tuple[str, ...] = (), **extra: object) -> dict[str, object]:
    return {"udquant_version": "0.1.0", "inputs": {"source": source},
            "levels": [{"level": lv, "file": f"M-{lv}.gguf", "recipe": {"file": f"M-{lv}.recipe.yaml"}}
                       for lv in levels], **extra}


@pytest.mark.parametrize("text", ['{"inputs": {"source": "o/M"}}', '{"mine": 1}', "[1, 2]", "not json"])
def test_a_result_json_udquant_did_not_write_is_never_replaced(tmp_path, text):
    (tmp_path / "udquant-result.json").write_text(text)
    with pytest.raises(InputError, match="udquant-result.json was not written by udquant and would be replaced"):
        check_out_dir(tmp_path, model())


def test_files_udquant_would_write_are_replaced_only_when_udquant_wrote_them(tmp_path):
    names = output_file_names(model(), ["UD-Q5_K_XL"], mmproj=True, plot=True)
    assert names == ["M-UD-Q5_K_XL.gguf", "M-UD-Q5_K_XL.recipe.yaml", "mmproj-M-F16.gguf", "kld-vs-bpw.png"]
    (tmp_path / "M-UD-Q5_K_XL.gguf").write_text("my own gguf")
    (tmp_path / "kld-vs-bpw.png").write_text("my plot")
    (tmp_path / "notes.txt").write_text("mine, but not in the way")
    with pytest.raises(InputError) as err:
        check_out_dir(tmp_path, model(), file_names=names)
    assert "holds files udquant did not write and would replace: M-UD-Q5_K_XL.gguf, kld-vs-bpw.png" in str(err.value)
    # The files a udquant result of this model lists are its own, and so are those of a run killed while writing.
    result = tmp_path / "udquant-result.json"
    result.write_text(json.dumps(result_json("o/M", ("UD-Q5_K_XL",), eval=[{}], out_dir_files=[])))
    check_out_dir(tmp_path, model(), file_names=names)
    result.write_text(json.dumps(result_json("o/M", ("UD-Q4_K_XL",), out_dir_files=["M-UD-Q4_K_XL.gguf"])))
    with pytest.raises(InputError, match="would replace: M-UD-Q5_K_XL.gguf, kld-vs-bpw.png"):
        check_out_dir(tmp_path, model(), file_names=names)
    (tmp_path / ".udquant-writing.json").write_text(json.dumps({"source": "o/M", "files": names}))
    check_out_dir(tmp_path, model(), file_names=names)
    # A result of a version before out_dir_files does not say which of udquant's names it wrote: all are its own.
    (tmp_path / ".udquant-writing.json").unlink()
    result.write_text(json.dumps(result_json("o/M", ("UD-Q4_K_XL",))))
    check_out_dir(tmp_path, model(), file_names=names)


@pytest.mark.parametrize("where", ["afile", "afile/sub", "denied/sub"])
def test_an_out_dir_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path, monkeypatch, where):
    (tmp_path / "afile").write_text("x")
    out_dir = tmp_path / where
    message = {"afile": "is a file, not a folder", "afile/sub": f"cannot be created: {tmp_path / 'afile'} is a file",
               "denied/sub": "cannot be created: Permission denied"}[where]

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # as a folder of another user would
    with pytest.raises(InputError, match=message):
        check_out_dir(out_dir, model())


def test_checking_an_out_dir_leaves_no_trace(tmp_path):
    check_out_dir(tmp_path / "a" / "b", model())
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out" / "README.md").mkdir(parents=True)
    with pytest.raises(InputError, match="holds folders where udquant writes files: README.md"):
        check_out_dir(tmp_path / "out", model())


def level_output(tmp_path: Path, level: str) -> LevelOutput:
    source = tmp_path / "work" / f"{level}.gguf"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(b"GGUF quant " + level.encode())
    verification = Verification(source, {"q5_K": 2}, 2, 512, 352)
    return LevelOutput(level, find_recipe(level, "llama"), source, verification)


def test_a_rerun_replaces_what_udquant_wrote_and_clears_only_its_own_partials(tmp_path):
    out = tmp_path / "out"
    toolchain = Toolchain(Path("/tc"), "b11434", "abc", "cpu", "pypi", "d" * 64)

    def run(*levels: str) -> dict[str, object]:
        names = output_file_names(model(), levels)
        check_out_dir(out, model(), file_names=names)
        write_outputs(out, model(), [level_output(tmp_path, lv) for lv in levels], ImatrixUse("none", None),
                      toolchain, {})
        return dict(json.loads((out / "udquant-result.json").read_text()))

    out.mkdir()
    dead = 2**22 + 12345  # above any pid the kernel hands out
    mine = out / f"draft.partial-{dead}.txt"
    mine.write_text("a user's draft")
    stale = out / f"M-UD-Q5_K_XL.partial-{dead}.gguf"
    stale.write_text("left by a killed run")
    result = run("UD-Q5_K_XL")
    assert mine.is_file() and not stale.exists()
    assert result["out_dir_files"] == ["M-UD-Q5_K_XL.gguf", "M-UD-Q5_K_XL.recipe.yaml"]
    assert not (out / ".udquant-writing.json").exists()
    # Another level, then the first again: the first level's files stay udquant's.
    assert run("UD-Q4_K_XL")["out_dir_files"] == ["M-UD-Q4_K_XL.gguf", "M-UD-Q4_K_XL.recipe.yaml",
                                                  "M-UD-Q5_K_XL.gguf", "M-UD-Q5_K_XL.recipe.yaml"]
    run("UD-Q5_K_XL")
    assert (out / "M-UD-Q5_K_XL.gguf").read_bytes() == b"GGUF quant UD-Q5_K_XL"
    # A user's file where a new level would go is not.
    (out / "M-UD-Q6_K_XL.gguf").write_text("my own gguf")
    with pytest.raises(InputError, match="would replace: M-UD-Q6_K_XL.gguf"):
        run("UD-Q6_K_XL")
    assert (out / "M-UD-Q6_K_XL.gguf").read_text() == "my own gguf"
    assert mine.read_text() == "a user's draft"
    # A folder an earlier version wrote (no out_dir_files): its files of this model's names stay udquant's,
    # and are recorded by the next run so that later runs may replace them too.
    (out / "M-UD-Q6_K_XL.gguf").unlink()
    old = {k: v for k, v in json.loads((out / "udquant-result.json").read_text()).items() if k != "out_dir_files"}
    (out / "udquant-result.json").write_text(json.dumps(old | {"levels": [], "eval": []}))
    (out / "kld-vs-bpw.png").write_text("plot of an earlier version's run")
    assert {"kld-vs-bpw.png", "M-UD-Q4_K_XL.gguf"} <= set(run("UD-Q5_K_XL")["out_dir_files"])
    assert "kld-vs-bpw.png" in output_file_names(model(), ["UD-Q5_K_XL"], plot=True)
    check_out_dir(out, model(), file_names=output_file_names(model(), ["UD-Q5_K_XL"], plot=True))


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


def test_shard_folders_are_replaced_only_when_they_hold_udquant_shards(tmp_path):
    names = ["M-UD-Q5_K_XL.gguf", "M-UD-Q4_K_XL.gguf"]
    check_out_dir(tmp_path, model(), split_names=names)
    ours = tmp_path / "split" / "M-UD-Q5_K_XL"
    for key in ("0123456789ab", "ba9876543210.partial-4242"):  # a finished split and a killed one
        (ours / key).mkdir(parents=True)
        (ours / key / "M-UD-Q5_K_XL-00001-of-00002.gguf").write_bytes(b"GGUF")
    (tmp_path / "split" / "my-notes").mkdir()  # not one of the folders replaced
    check_out_dir(tmp_path, model(), split_names=names)

    (ours / "0123456789ab" / "notes.txt").write_text("mine")
    theirs = tmp_path / "split" / "M-UD-Q4_K_XL"
    theirs.mkdir()
    (theirs / "draft.gguf").write_text("mine")
    with pytest.raises(InputError, match="would replace: split/M-UD-Q4_K_XL, split/M-UD-Q5_K_XL"):
        check_out_dir(tmp_path, model(), split_names=names)
    check_out_dir(tmp_path, model())  # nothing is split when nothing is uploaded

    other = tmp_path / "other"
    other.mkdir()
    (other / "split").write_text("a file")
    with pytest.raises(InputError, match="split is a file where udquant puts the shards"):
        check_out_dir(other, model(), split_names=names)
