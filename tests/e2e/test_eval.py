"""The eval stage with the real converter, llama-quantize and llama-perplexity on tiny models."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import run_cli
from udquant.convert import convert_to_gguf
from udquant.errors import InputError
from udquant.evaluate import (
    MAX_EVAL_CHUNKS,
    EvalMismatchError,
    EvalOutputError,
    build_kld_args,
    compute_logits_base,
    measure_quant,
    parse_kld_output,
    quantize_reference,
    read_base_logits,
    sidecar_path,
)
from udquant.gguf_header import read_gguf_header
from udquant.library import data_file
from udquant.quantize import quantize_model
from udquant.recipe import find_recipe, plan_quantization
from udquant.tiny_model import TinySpec, make_tiny_model

pytestmark = pytest.mark.e2e

CHUNKS, CONTEXT = 4, 256


def convert(toolchain, model: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return convert_to_gguf(toolchain, model, folder / "model-bf16.gguf", no_mtp=False, model_name="tiny",
                           log_path=folder / "convert.log")


@pytest.fixture(scope="module")
def measured(llama, toolchain, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    bf16 = convert(toolchain, llama, root)
    base = compute_logits_base(toolchain, bf16, data_file("eval.txt"), root / "base.kld", chunks=CHUNKS,
                               context=CONTEXT, log_path=root / "base.log")
    plan = plan_quantization(find_recipe("UD-Q5_K_XL", "llama"), read_gguf_header(bf16))
    (root / "ud").mkdir()
    ud = quantize_model(toolchain, bf16, plan, root / "ud" / "model.gguf", imatrix=None, log_path=root / "ud.log")
    return root, bf16, base, ud


def test_base_logits_file_and_sidecar(measured):
    root, _, base, _ = measured
    logits = read_base_logits(base)
    assert (logits.context, logits.n_vocab, logits.chunks) == (CONTEXT, 1024, CHUNKS)
    assert (logits.architecture, logits.context_length, logits.layers, logits.embedding_length) == (
        "llama", 512, 4, 256)
    assert json.loads(sidecar_path(base).read_text())["eval_text"] == "eval.txt"
    assert not list(root.glob("*.partial-*"))


def test_kld_of_a_real_quant_is_sane(measured, toolchain):
    root, _, base, ud = measured
    result = measure_quant(toolchain, ud, base, log_path=root / "kld-ud.log")
    assert (result.chunks, result.context) == (CHUNKS, CONTEXT)
    assert 0 < result.median_kld <= result.kld_p99 <= result.max_kld
    assert 0 < result.mean_kld < 0.05 and result.mean_kld_stderr < result.mean_kld
    assert 0.5 < result.same_top_p <= 1.0
    assert result.ppl_ratio is not None and abs(result.ppl_ratio - 1) < 0.05
    # The base perplexity stored with the logits is the one the base run printed.
    # (the base run's own last lines can be lost at exit: compare only when they survived)
    final = re.search(r"Final estimate: PPL = ([\d.]+)", (root / "base.log").read_text())
    assert result.ppl_base is not None
    if final:
        assert result.ppl_base == pytest.approx(float(final.group(1)), rel=1e-4)


def test_fewer_bits_diverge_more(measured, toolchain):
    root, bf16, base, ud = measured
    q4 = quantize_reference(toolchain, bf16, "Q4_K_M", root / "q4_k_m.gguf", imatrix=None, log_path=root / "q4.log")
    reference = measure_quant(toolchain, q4, base, log_path=root / "kld-q4.log")
    ours = measure_quant(toolchain, ud, base, log_path=root / "kld-ud-again.log")
    assert reference.mean_kld > ours.mean_kld
    assert read_gguf_header(q4).tensor("blk.0.ffn_up.weight").type_name == "q4_K"


@pytest.fixture(scope="module")
def other_vocab(toolchain, tmp_path_factory) -> Path:
    """A tiny llama whose vocabulary is padded to 1280 tokens (the converter adds [PADn] tokens)."""
    import transformers

    root = tmp_path_factory.mktemp("vocab1280")
    model_dir = make_tiny_model(root / "tiny-llama-1280", TinySpec(seed=5))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(1280)
    model.save_pretrained(model_dir, safe_serialization=True)
    return convert(toolchain, model_dir, root / "gguf")


def test_llama_perplexity_itself_prints_numbers_for_another_vocab(measured, other_vocab, toolchain):
    """Why measure_quant checks first: the tool says so on stderr, exits 0 and prints a KLD."""
    _, _, base, _ = measured
    proc = subprocess.run(build_kld_args(toolchain, other_vocab, base, context=CONTEXT), capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0
    assert "inconsistent vocabulary (1024 vs 1280)" in proc.stderr
    with pytest.raises(EvalMismatchError, match="1024 for the base, 1280 for the quant"):
        parse_kld_output(proc.stdout + proc.stderr)


def test_base_of_another_vocab_is_refused(measured, other_vocab, toolchain, tmp_path):
    _, _, base, _ = measured
    with pytest.raises(EvalMismatchError, match="vocabulary size is 1024 for the base, 1280 for the quant"):
        measure_quant(toolchain, other_vocab, base, log_path=tmp_path / "kld.log")
    assert not (tmp_path / "kld.log").exists()  # refused before llama-perplexity ran


@pytest.fixture(scope="module")
def deeper(toolchain, tmp_path_factory) -> Path:
    """A tiny llama of the same vocabulary, widths and context, with 6 layers instead of 4."""
    root = tmp_path_factory.mktemp("deeper")
    return convert(toolchain, make_tiny_model(root / "tiny-llama-6l", TinySpec(num_layers=6, seed=6)), root / "gguf")


def test_base_of_a_model_with_other_layers_is_refused(measured, deeper, toolchain, tmp_path):
    """llama-perplexity itself compares only the vocabulary: it would print a KLD table."""
    _, _, base, _ = measured
    with pytest.raises(EvalMismatchError, match=r"layer count \(without MTP layers\) is 4 for the base, 6 for"):
        measure_quant(toolchain, deeper, base, log_path=tmp_path / "kld.log")
    assert not (tmp_path / "kld.log").exists()


@pytest.fixture(scope="module")
def short_context(llama, toolchain, tmp_path_factory) -> Path:
    """The same weights, but a config that declares a 128-token context."""
    root = tmp_path_factory.mktemp("ctx128")
    model_dir = root / "tiny-llama-ctx128"
    shutil.copytree(llama, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 128
    (model_dir / "config.json").write_text(json.dumps(config))
    return convert(toolchain, model_dir, root / "gguf")


def test_base_of_another_context_is_refused(measured, short_context, toolchain, tmp_path):
    _, _, base, _ = measured
    with pytest.raises(EvalMismatchError, match="trained context length is 512 for the base, 128 for the quant"):
        measure_quant(toolchain, short_context, base, log_path=tmp_path / "kld.log")
    # Without the sidecar, the header alone still shows the eval context does not fit.
    bare = tmp_path / "bare.kld"
    shutil.copyfile(base, bare)
    with pytest.raises(EvalMismatchError, match="eval context .* is 256 for the base, 128 for the quant"):
        measure_quant(toolchain, short_context, bare, log_path=tmp_path / "kld.log")
    assert not (tmp_path / "kld.log").exists()


def test_eval_text_too_short_is_an_error_and_leaves_nothing(measured, toolchain, tmp_path):
    _, bf16, _, _ = measured
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill one chunk of the context.")
    # llama-perplexity logs its reason from a background thread that may not flush before it exits: when the
    # reason survives it is an InputError naming the text, otherwise an EvalOutputError; never a number or a file.
    with pytest.raises((InputError, EvalOutputError)) as err:
        compute_logits_base(toolchain, bf16, short, tmp_path / "base.kld", chunks=2, context=CONTEXT,
                            log_path=tmp_path / "base.log")
    if isinstance(err.value, InputError) and not isinstance(err.value, EvalOutputError):
        assert "short.txt is too short for one eval chunk of 256 tokens" in str(err.value)
    assert not list(tmp_path.glob("base.kld*"))


def test_an_eval_text_holding_fewer_chunks_is_measured_whole_and_said(measured, toolchain, tmp_path, caplog):
    _, bf16, _, _ = measured
    caplog.set_level(logging.INFO, logger="udquant.evaluate")
    base = compute_logits_base(toolchain, bf16, data_file("eval.txt"), tmp_path / "base.kld",
                               chunks=MAX_EVAL_CHUNKS, context=512, log_path=tmp_path / "base.log")
    held = read_base_logits(base).chunks
    assert 1 < held < MAX_EVAL_CHUNKS
    assert f"eval.txt holds {held} chunks of 512 tokens, fewer than the {MAX_EVAL_CHUNKS} asked for" in caplog.text


def test_eval_command_measures_files_and_reuses_what_it_measured(measured, tmp_path):
    """`udquant eval BF16 QUANT...`: the card's table on stdout, numbers in JSON, and a rerun with one
    more file runs llama-perplexity only for the new one."""
    _, bf16, _, ud = measured
    other = tmp_path / "other.gguf"
    shutil.copyfile(ud, other)
    work = tmp_path / "work"
    common = ["--eval-chunks", "2", "--eval-context", str(CONTEXT), "--work-dir", work]
    first = run_cli("eval", bf16, ud, *common, "--json", tmp_path / "reports" / "first.json", cwd=tmp_path,
                    program="udquant")
    assert first.returncode == 0, first.stderr
    assert "| Quant | Size | Bits per weight | Mean KLD |" in first.stdout and "| model |" in first.stdout
    report = json.loads((tmp_path / "reports" / "first.json").read_text())
    assert report["eval_text"]["text"] == "eval.txt" and report["eval_text"]["bundled"] is True
    assert report["eval_text"]["sha256"] == hashlib.sha256(data_file("eval.txt").read_bytes()).hexdigest()
    assert [row["chunks"] for row in report["eval"]] == [2]
    (stage,) = work.glob("eval-base-*")
    logs = {log.name: log.stat().st_mtime_ns for log in stage.glob("*.log")}
    assert set(logs) == {"eval-base.log", "kld-model.log"}

    second = run_cli("eval", bf16, ud, other, *common, "--json", tmp_path / "second.json", cwd=tmp_path,
                     program="udquant")
    assert second.returncode == 0, second.stderr
    rows = json.loads((tmp_path / "second.json").read_text())["eval"]
    assert [row["label"] for row in rows] == ["model", "other"]
    assert rows[0] == report["eval"][0]  # reused, not measured again
    assert rows[1]["mean_kld"] == pytest.approx(rows[0]["mean_kld"], rel=1e-6)  # same bytes, same numbers
    assert {log.name: log.stat().st_mtime_ns for log in stage.glob("*.log") if log.name in logs} == logs


def test_eval_command_refuses_bad_settings(measured, tmp_path):
    _, bf16, _, ud = measured
    cases = {
        ("--eval-context", "33"): "--eval-context must be an even number >= 32, not 33",
        ("--eval-chunks", "0"): "--eval-chunks must be between 1 and 32, not 0",
        ("--eval-chunks", "1", "--eval-context", "128"): "1 chunk(s) of 128 tokens score 63 tokens",
        ("--eval-text", "missing.txt"): "eval text not found: missing.txt",
    }
    for args, message in cases.items():
        proc = run_cli("eval", bf16, ud, *args, "--work-dir", tmp_path / "work", cwd=tmp_path, program="udquant")
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr
    proc = run_cli("eval", bf16, tmp_path / "nope.gguf", "--work-dir", tmp_path / "work", cwd=tmp_path,
                   program="udquant")
    assert proc.returncode == 2 and "no such file" in proc.stderr and "nope.gguf" in proc.stderr
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").glob("eval-base-*/*.logits"))


def test_eval_command_on_a_custom_text(measured, tmp_path):
    _, bf16, _, ud = measured
    text = tmp_path / "my-domain.txt"
    text.write_text(data_file("calibration.txt").read_text())
    proc = run_cli("eval", bf16, ud, "--eval-text", text, "--eval-chunks", "2", "--eval-context", "128",
                   "--work-dir", tmp_path / "work", "--json", tmp_path / "r.json", cwd=tmp_path, program="udquant")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["eval_text"] | {"sha256": ""} == {"text": "my-domain.txt", "bundled": False, "sha256": "",
                                                  "bytes": text.stat().st_size, "chunks": 2, "context": 128}
    assert str(tmp_path) not in (tmp_path / "r.json").read_text()
    assert [(row["chunks"], row["context"]) for row in report["eval"]] == [(2, 128)]
