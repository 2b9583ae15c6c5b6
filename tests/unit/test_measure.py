"""Eval settings are checked before any work, describe no local path, and count in the disk estimate."""

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from udquant.errors import InputError
from udquant.evaluate import base_logits_bytes
from udquant.job import _estimate_bytes
from udquant.library import data_file
from udquant.measure import EvalSettings, eval_disk_bytes
from udquant.recipe import find_recipe
from udquant.resolve import ModelInfo


@pytest.mark.parametrize(("settings", "message"), [
    (EvalSettings(chunks=0), "--eval-chunks must be between 1 and 32, not 0"),
    (EvalSettings(chunks=33), "--eval-chunks must be between 1 and 32, not 33"),
    (EvalSettings(context=511), "--eval-context must be an even number >= 32, not 511"),
    (EvalSettings(context=16), "--eval-context must be an even number >= 32, not 16"),
    (EvalSettings(chunks=1, context=128), "1 chunk(s) of 128 tokens score 63 tokens"),
    (EvalSettings(text=Path("/no/such/text.txt")), "eval text not found: /no/such/text.txt"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(InputError) as err:
        settings.check()
    assert message in str(err.value)


def test_empty_text_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.touch()
    with pytest.raises(InputError, match="eval text is empty"):
        EvalSettings(text=empty).check()


def test_describe_names_the_text_without_its_path(tmp_path):
    bundled = EvalSettings().describe()
    assert bundled["text"] == "eval.txt" and bundled["bundled"] is True
    assert bundled["sha256"] == hashlib.sha256(data_file("eval.txt").read_bytes()).hexdigest()
    own = tmp_path / "secret-project" / "domain.txt"
    own.parent.mkdir()
    own.write_text("hello " * 1000)
    described = EvalSettings(text=own, chunks=4, context=256).describe()
    assert described == {"text": "domain.txt", "bundled": False,
                         "sha256": hashlib.sha256(own.read_bytes()).hexdigest(), "bytes": 6000,
                         "chunks": 4, "context": 256}
    assert "secret-project" not in repr(described)


def test_disk_estimate_counts_base_logits_and_references():
    qwen = ModelInfo(source="o/m", name="m", repo_id="o/m", revision="r", local_dir=None,
                     hf_architecture="Qwen3_5ForConditionalGeneration", llama_arch="qwen35",
                     n_params=27_000_000_000, weights_bytes=54_000_000_000, weight_names=(),
                     declared_mtp_layers=0, vocab_size=248_320)
    recipes = [find_recipe("UD-Q5_K_XL", "qwen35"), find_recipe("UD-Q4_K_XL", "qwen35")]
    settings = EvalSettings(chunks=32, context=512)
    without = _estimate_bytes(qwen, recipes, True)
    with_eval = _estimate_bytes(qwen, recipes, True, settings)
    logits = base_logits_bytes(248_320, 512, 32)
    assert 4.0e9 < logits < 4.1e9  # the figure evaluate.py's MAX_EVAL_CHUNKS comment gives
    # two base types (Q5_K, Q4_K) -> two standard quants, each at most the larger level's estimate
    assert with_eval - without - logits == pytest.approx(2 * 27e9 * (5.5 + 1) / 8, rel=0.01)
    assert eval_disk_bytes(settings, 248_320) == logits
    assert _estimate_bytes(replace(qwen, vocab_size=0), recipes, True, settings) > without


def test_split_parts_are_refused_before_anything_runs(tmp_path):
    from udquant.measure import compare_files
    from udquant.toolchain import Toolchain

    bf16, part = tmp_path / "m-bf16.gguf", tmp_path / "m-Q4_K_M-00001-of-00002.gguf"
    bf16.write_bytes(b"GGUF")
    part.write_bytes(b"GGUF")
    toolchain = Toolchain(tmp_path, "b11434", "x", "cpu", "pypi", "d" * 64)
    with pytest.raises(InputError, match="one part of a split GGUF") as err:
        compare_files(toolchain, bf16, [part], EvalSettings(), tmp_path / "work")
    assert "llama-gguf-split --merge" in (err.value.hint or "")
    assert not (tmp_path / "work").exists()


def test_eval_options_without_eval_are_refused():
    import argparse

    from udquant.cli import add_job_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    with pytest.raises(InputError, match="--eval-text, --eval-context only apply with --eval"):
        options_from_args(parser.parse_args(["./m", "--eval-text", "t.txt", "--eval-context", "256"]))
    assert not options_from_args(parser.parse_args(["./m"])).evaluate


def test_missing_matplotlib_is_said_before_any_work(monkeypatch):
    import sys

    from udquant.measure import require_plotting

    require_plotting()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError, match="needs matplotlib") as err:
        require_plotting()
    assert "udquant[eval]" in (err.value.hint or "")
