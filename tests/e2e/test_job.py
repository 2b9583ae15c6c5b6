"""The whole job through its real CLI, with the real converter and llama.cpp binaries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.e2e.conftest import FAST_IMATRIX, run_cli
from udquant.errors import ToolError, VerificationError
from udquant.gguf_header import read_gguf_header
from udquant.library import data_file
from udquant.output import sha256_file
from udquant.publish import split_for_upload
from udquant.quantize import quantize_model
from udquant.recipe import find_recipe, plan_quantization
from udquant.verify import verify_quantized

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def llama_run(llama, toolchain, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-run")
    # Relative folders and toolchain, as a user types them: the tools run inside stage folders.
    proc = run_cli(llama, "--work-dir", "work", "--out-dir", "out", *FAST_IMATRIX, cwd=root,
                   env={"UDQUANT_LLAMA_CPP": os.path.relpath(toolchain.root, root)})
    assert proc.returncode == 0, proc.stderr
    return root, proc


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.type_name for t in read_gguf_header(path).tensors}


def test_last_line_is_the_output_folder(llama_run):
    root, proc = llama_run
    assert proc.stdout.strip().splitlines()[-1] == str((root / "out").resolve())
    assert "q8_0: 2 tensors, q6_K: 4, q5_K: 24, f32: 9" in proc.stderr
    for stage in ("resolve", "fetch", "convert", "imatrix", "quantize UD-Q5_K_XL", "output"):
        assert stage in proc.stderr


def test_recipe_equals_llama_cpp_q5_k_m_with_q8_0_embeddings(llama_run, toolchain):
    """The built-in recipe reproduces llama.cpp's own Q5_K_M choice, tensor by tensor."""
    root, _ = llama_run
    bf16 = next((root / "work").glob("convert-*/model-bf16.gguf"))
    reference = root / "reference.gguf"
    subprocess.run([toolchain.tool("llama-quantize"), "--token-embedding-type", "q8_0", "--output-tensor-type",
                    "q8_0", bf16, reference, "Q5_K_M"], check=True, capture_output=True)
    ours = types_of(root / "out" / "tiny-llama-UD-Q5_K_XL.gguf")
    assert ours == types_of(reference)
    assert ours["token_embd.weight"] == "q8_0" and ours["blk.3.ffn_down.weight"] == "q6_K"


def test_result_json_and_card(llama_run, toolchain):
    root, _ = llama_run
    out = root / "out"
    result = json.loads((out / "udquant-result.json").read_text())
    level = result["levels"][0]
    assert level["level"] == "UD-Q5_K_XL" and level["recipe"]["id"] == "llama/UD-Q5_K_XL"
    assert level["type_counts"] == {"q8_0": 2, "q6_K": 4, "q5_K": 24, "f32": 9}
    assert level["sha256"] == sha256_file(out / level["file"])
    assert 5.5 < level["bits_per_weight"] < 8.5
    assert result["llama_cpp"]["tag"] == "b11434" and result["llama_cpp"]["tree_sha256"] == toolchain.tree_sha256
    assert result["imatrix"]["source"] == "computed"
    assert result["imatrix"]["datasets"] == ["udquant-calibration.txt"]
    assert result["inputs"]["llama_arch"] == "llama" and result["inputs"]["n_params"] > 0
    assert {"convert", "imatrix", "quantize UD-Q5_K_XL"} <= set(result["timings"])
    card = ModelCard.load(out / "README.md")
    # A local folder has no Hub id to name as base_model (the Hub would refuse a folder name there).
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()
    assert {"gguf", "imatrix", "ud-quant"} <= set(card.data.tags)
    assert "q8_0: 2 tensors, q6_K: 4, q5_K: 24, f32: 9" in card.text
    assert (out / "tiny-llama-UD-Q5_K_XL.recipe.yaml").is_file()


def test_no_local_paths_leak_into_the_gguf(llama_run):
    root, _ = llama_run
    metadata = read_gguf_header(root / "out" / "tiny-llama-UD-Q5_K_XL.gguf").metadata
    assert metadata["quantize.imatrix.file"] == "imatrix.gguf"
    assert metadata["quantize.imatrix.dataset"] == "udquant-calibration.txt"
    assert not any(str(root) in str(value) for value in metadata.values())


def test_large_files_are_split_for_upload_and_old_shards_never_reused(llama_run, toolchain, tmp_path):
    root, _ = llama_run
    gguf = tmp_path / "tiny-llama-UD-Q5_K_XL.gguf"
    shutil.copyfile(root / "out" / gguf.name, gguf)
    dest = tmp_path / "split"

    def split(size: int) -> list[Path]:
        return split_for_upload(toolchain, gguf, dest, size, log_path=tmp_path / "split.log")

    assert split(gguf.stat().st_size) == [gguf]
    shards = split(1_000_000)
    count = len(shards)
    assert count >= 2
    assert [s.name for s in shards] == [f"{gguf.stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    held = sorted(t.name for shard in shards for t in read_gguf_header(shard).tensors)
    assert held == sorted(t.name for t in read_gguf_header(gguf).tensors)
    stamps = [s.stat().st_mtime_ns for s in shards]
    assert split(1_000_000) == shards and [s.stat().st_mtime_ns for s in shards] == stamps  # reused

    # A new file under the same name (a rerun with another recipe), or another size: split again.
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    again = split(1_000_000)
    assert again[0].parent != shards[0].parent and not shards[0].exists()
    assert split(2_000_000)[0].parent != again[0].parent and not again[0].exists()

    # A split that fails leaves nothing behind that a rerun could upload.
    gguf.write_bytes(b"GGUF" + b"\0" * 3_000_000)
    with pytest.raises(ToolError):
        split(1_000_000)
    assert not list(dest.rglob("*.gguf"))


def test_two_levels_convert_and_compute_the_imatrix_once(qwen3, toolchain, tmp_path):
    args = [qwen3, "--quant", "UD-Q5_K_XL", "--quant", "UD-Q4_K_XL", "--work-dir", tmp_path / "work",
            "--out-dir", tmp_path / "out", *FAST_IMATRIX]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    work = tmp_path / "work"
    assert len(list(work.glob("convert-*"))) == 1 and len(list(work.glob("imatrix-*"))) == 1
    assert len(list(work.glob("quantize-*"))) == 2
    q4 = types_of(tmp_path / "out" / "tiny-qwen3-UD-Q4_K_XL.gguf")
    assert q4["blk.0.ffn_up.weight"] == "q4_K" and q4["output.weight"] == "q8_0"
    assert "blk.0.attn_q_norm.weight" in q4  # qwen3's own tensors went through
    digests = {p.name: sha256_file(p) for p in (tmp_path / "out").glob("*.gguf")}
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    timings = json.loads((tmp_path / "out" / "udquant-result.json").read_text())["timings"]
    assert all(timings[s]["cached"] for s in ("convert", "imatrix", "quantize UD-Q5_K_XL", "quantize UD-Q4_K_XL"))
    assert digests == {p.name: sha256_file(p) for p in (tmp_path / "out").glob("*.gguf")}
    assert not list(tmp_path.rglob("*.partial-*"))


def test_k_quant_fallback_is_refused_before_quantizing_and_caught_by_verification(odd_llama, toolchain, tmp_path):
    proc = run_cli(odd_llama, "--imatrix", "none", "--work-dir", tmp_path / "work", "--out-dir",
                   tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "llama-quantize would write another type for them" in proc.stderr
    assert "q5_K on rows of 320 -> q5_1" in proc.stderr and "fallbacks: {q5_K: q5_1, q6_K: q8_0}" in proc.stderr
    assert not list((tmp_path / "work").glob("quantize-*")) and not list((tmp_path / "work").glob("imatrix-*"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.gguf"))

    # Had it run, the real llama-quantize would exit 0 with other types; reading the file tells.
    bf16 = next((tmp_path / "work").glob("convert-*/model-bf16.gguf"))
    plan = plan_quantization(find_recipe("UD-Q5_K_XL", "llama"), read_gguf_header(bf16))
    out = tmp_path / "forced" / "model.gguf"
    out.parent.mkdir()
    quantize_model(toolchain, bf16, plan, out, imatrix=None, log_path=tmp_path / "forced" / "quantize.log")
    with pytest.raises(VerificationError, match="does not match recipe llama/UD-Q5_K_XL") as err:
        verify_quantized(out, plan)
    assert ("expected q5_K, got q5_1 (llama-quantize fell back: row length 320 is not a multiple of 256"
            in str(err.value))


def test_imatrix_of_another_model_is_refused(llama_run, odd_llama, tmp_path):
    root, _ = llama_run
    imatrix = next((root / "work").glob("imatrix-*/imatrix.gguf"))
    proc = run_cli(odd_llama, "--imatrix", imatrix, "--work-dir", tmp_path / "work", "--out-dir",
                   tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "does not fit this model's tensor widths" in proc.stderr
    assert "blk.0.ffn_down.weight: imatrix width 512, tensor row length 640" in proc.stderr


def test_truncated_imatrix_is_reported(llama_run, llama, tmp_path):
    root, _ = llama_run
    imatrix = next((root / "work").glob("imatrix-*/imatrix.gguf"))
    broken = tmp_path / "broken.imatrix.gguf"
    broken.write_bytes(imatrix.read_bytes()[:-64])
    proc = run_cli(llama, "--imatrix", broken, "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert proc.returncode == 6, proc.stderr
    assert "truncated" in proc.stderr


def test_a_calibration_text_holding_fewer_chunks_than_asked_is_used_whole_and_said(llama_run, llama, tmp_path):
    root, _ = llama_run
    text = tmp_path / "calibration.txt"
    text.write_text(data_file("calibration.txt").read_text()[:8000])
    proc = run_cli(llama, "--calibration", text, "--imatrix-chunks", "500", "--imatrix-context", "128",
                   "--work-dir", root / "work", "--out-dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    held = json.loads((tmp_path / "out" / "udquant-result.json").read_text())["imatrix"]["chunk_count"]
    assert 2 <= held < 500
    assert f"the calibration text holds {held} chunks of 128 tokens, not the 500 asked for" in proc.stderr


def test_tool_failure_shows_its_output(llama_run, llama, tmp_path):
    root, _ = llama_run
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill one chunk.")
    # llama-imatrix's own words about the text being too short are its last line, which the pinned
    # build now and then loses at exit (its logger thread is not flushed): they must show in one of three.
    stderrs = []
    for _ in range(3):
        proc = run_cli(llama, "--calibration", short, "--work-dir", root / "work", "--out-dir", tmp_path / "out",
                       *FAST_IMATRIX, cwd=tmp_path)
        assert proc.returncode == 4, proc.stderr
        assert "imatrix: llama-imatrix exited with code" in proc.stderr
        assert not (tmp_path / "out").exists()
        stderrs.append(proc.stderr)
        if "tokens" in proc.stderr:
            break
    assert any("tokens" in stderr for stderr in stderrs), stderrs[-1]


def test_a_rerun_needs_no_room_for_what_is_already_converted(llama_run, llama):
    root, _ = llama_run
    proc = run_cli(llama, "--work-dir", "work", "--out-dir", "out", *FAST_IMATRIX, "-v", cwd=root)
    assert proc.returncode == 0, proc.stderr
    bf16 = next((root / "work").glob("convert-*/model-bf16.gguf"))
    assert f", {bf16.stat().st_size} of them already here" in proc.stderr


# The real converter, run once "another model's job" given the same --out-dir has finished there.
CONVERTER_AFTER_ANOTHER_JOB = """import json, os, shutil, sys
from pathlib import Path
shared = Path({shared!r})
shared.mkdir(exist_ok=True)
result = json.loads(Path({result!r}).read_text())
result["inputs"]["source"] = "someone/Other-8B"
(shared / "udquant-result.json").write_text(json.dumps(result))
shutil.copy({card!r}, shared / "README.md")
os.execv(sys.executable, [sys.executable, {real!r}, *sys.argv[1:]])
"""


def test_another_models_results_written_meanwhile_stop_the_job_before_it_writes(llama_run, llama, toolchain,
                                                                              tmp_path):
    """Two models' jobs given one --out-dir at once: the later to finish stops before replacing the other's
    card and result, and a rerun with its own --out-dir redoes none of its stages."""
    root, _ = llama_run
    shared = tmp_path / "shared"
    wrapped = tmp_path / "toolchain"
    (wrapped / "src").mkdir(parents=True)
    (wrapped / "bin").symlink_to(toolchain.tool("llama-quantize").parent)
    shutil.copy(toolchain.root / "toolchain.json", wrapped)
    for entry in toolchain.converter.parent.iterdir():
        if entry != toolchain.converter:
            (wrapped / "src" / entry.name).symlink_to(entry)
    (wrapped / "src" / toolchain.converter.name).write_text(CONVERTER_AFTER_ANOTHER_JOB.format(
        shared=str(shared), result=str(root / "out" / "udquant-result.json"), card=str(root / "out" / "README.md"),
        real=str(toolchain.converter)))
    env = {"UDQUANT_LLAMA_CPP": str(wrapped)}
    args = [llama, "--work-dir", tmp_path / "work", "--imatrix", "none"]

    proc = run_cli(*args, "--out-dir", shared, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"{shared} holds udquant's results for someone/Other-8B, not for" in proc.stderr
    assert sorted(p.name for p in shared.iterdir()) == ["README.md", "udquant-result.json"]
    assert json.loads((shared / "udquant-result.json").read_text())["inputs"]["source"] == "someone/Other-8B"

    proc = run_cli(*args, "--out-dir", tmp_path / "own", "-v", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    timings = json.loads((tmp_path / "own" / "udquant-result.json").read_text())["timings"]
    assert timings["convert"]["cached"] and timings["quantize UD-Q5_K_XL"]["cached"]


@pytest.mark.parametrize(("recipe", "level"), [("llama/UD-Q5_K_XL", "UD-Q4_K_XL"),
                                               ("llama/UD-Q4_K_XL", "UD-Q5_K_XL")])  # the default level too
def test_a_recipe_and_a_quant_level_that_disagree_are_refused(llama, tmp_path, recipe, level):
    proc = run_cli(llama, "--recipe", recipe, "--quant", level, "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"--recipe {recipe} makes {recipe.split('/')[1]}, and --quant asks for {level}" in proc.stderr


def test_not_enough_disk(llama, toolchain, tmp_path):
    proc = run_cli(llama, "--disk-reserve-gb", "1e9", "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert proc.returncode == 7, proc.stderr
    assert "not enough disk space" in proc.stderr
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").glob("convert-*"))


@pytest.mark.parametrize(("source", "message"), [
    ("not a repo", "is neither an existing directory nor a Hugging Face repo id"),
    ("./no/such/dir", "no such directory"),
])
def test_bad_source(source, message, tmp_path):
    proc = run_cli(source, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize(("option", "message"), [
    (["--imatrix", "sometimes"], "--imatrix must be auto, none, compute or an existing file"),
    (["--imatrix-chunks", "0"], "--imatrix-chunks: '0' is not a number of chunks (a whole number >= 1)"),
    (["--imatrix-context", "16"], "--imatrix-context: '16' is not a number of tokens (a whole number >= 32)"),
    (["--threads", "0"], "--threads: '0' is not a number of threads (a whole number >= 1)"),
    (["--imatrix", "none", "--imatrix-context", "512"], "--imatrix-context only applies when the imatrix is"),
    (["--split-size-gb", "nan"], "--split-size-gb: 'nan' is not a size in GB"),
    (["--quant", "UD-Q4_K_XL", "--quant", "UD-Q4_K_XL"], "--quant UD-Q4_K_XL is given more than once"),
    (["--imatrix", "none", "--calibration", "calibration.txt"], "--calibration only applies when the imatrix is"),
    (["--mtp"], "--mtp does not apply to LlamaForCausalLM"),
    (["--work-dir", "afile"], "--work-dir afile: afile is a file, not a folder"),
])
def test_bad_option_values(llama, tmp_path, option, message):
    (tmp_path / "afile").write_text("a file")
    proc = run_cli(llama, *option, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr


def test_udquant_job_subcommand_is_the_same(llama_run, llama, tmp_path):
    root, _ = llama_run
    proc = run_cli("job", llama, "--work-dir", root / "work", "--out-dir", tmp_path / "out", *FAST_IMATRIX,
                   cwd=tmp_path, program="udquant")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str((tmp_path / "out").resolve())


def test_recipe_of_another_architecture_is_refused(llama, toolchain, tmp_path):
    proc = run_cli(llama, "--recipe", "qwen3/UD-Q4_K_XL", "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert proc.returncode == 2
    assert "recipe qwen3/UD-Q4_K_XL is for architecture qwen3, the model is llama" in proc.stderr
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").glob("convert-*"))


def test_eval_measures_every_level_and_the_standard_quant(llama, toolchain, tmp_path):
    proc = run_cli(llama, "--eval", "--eval-chunks", "2", "--imatrix", "none", "--work-dir", tmp_path / "work",
                   "--out-dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    result = json.loads((out / "udquant-result.json").read_text())
    rows = result["eval"]
    assert [r["label"] for r in rows] == ["UD-Q5_K_XL", "Q5_K_M (standard)"]
    assert result["eval_text"] | {"sha256": "", "bytes": 0} == {"text": "eval.txt", "bundled": True, "sha256": "",
                                                                "bytes": 0, "chunks": 2, "context": 512}
    for row in rows:
        assert row["mean_kld"] >= 0 and 0 <= row["same_top_p"] <= 1 and row["chunks"] == 2
    card = (out / "README.md").read_text()
    assert "## Quality" in card and "| UD-Q5_K_XL |" in card and "kld-vs-bpw.png" in card
    assert "bundled held-out English text" in card
    assert (out / "kld-vs-bpw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
