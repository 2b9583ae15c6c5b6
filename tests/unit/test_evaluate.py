"""The eval stage without running anything: argv builders, the base-logits header, the parser
on real llama-perplexity output, the card table and the plot.

tests/data/perplexity-kld*.txt are log files written by udquant.runner.run_tool around the
pinned llama-perplexity (b11434, CPU) on the tiny llama of udquant.tiny_model (random weights,
UD-Q5_K_XL quant, job/udquant/data/eval.txt, context 256, 8 chunks); local paths were replaced
by <tmp>, <repo> and <toolchain>. The vocab-mismatch file is the same command on a model whose
vocabulary was padded to 1280 tokens: llama-perplexity says so on stderr, exits 0 and prints numbers.
The summary-lost file is one of 60 identical runs whose last lines the tool lost at exit.
"""

import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from udquant.errors import InputError
from udquant.evaluate import (
    LOST_SUMMARY_ATTEMPTS,
    MAX_EVAL_CHUNKS,
    BaseLogits,
    EvalMismatchError,
    EvalOutputError,
    EvalResult,
    ModelFacts,
    QuantEval,
    base_logits_bytes,
    build_base_logits_args,
    build_kld_args,
    build_reference_quantize_args,
    check_base_fits,
    compute_logits_base,
    measure_quant,
    parse_kld_output,
    read_base_logits,
    read_model_facts,
    render_eval_table,
    sidecar_path,
    summary_lost,
)
from udquant.plot import plot_kld_vs_bpw
from udquant.toolchain import Toolchain

DATA = Path(__file__).parents[1] / "data"
CPU = Toolchain(Path("/tc"), "b11434", "abc", "cpu", "pypi", "d" * 64)
GPU = Toolchain(Path("/tc"), "b11434", "abc", "cuda", "git", "d" * 64)


def real_output(name: str) -> str:
    return (DATA / name).read_text()


def test_parses_real_kld_output():
    result = parse_kld_output(real_output("perplexity-kld.txt"))
    assert result == EvalResult(mean_kld=0.000470, mean_kld_stderr=0.000004, kld_p99=0.000819,
                                median_kld=0.000430, max_kld=0.000880, same_top_p=0.81988,
                                ppl=1103.160131, ppl_base=1101.476954, ppl_ratio=1.001528, chunks=8, context=256)


def test_vocab_mismatch_in_the_output_is_an_error_not_a_number():
    with pytest.raises(EvalMismatchError, match="vocabulary size is 1024 for the base, 1280 for the quant"):
        parse_kld_output(real_output("perplexity-kld-vocab-mismatch.txt"))


def test_too_few_tokens_says_why_there_are_no_statistics():
    with pytest.raises(EvalOutputError, match="printed no KL-divergence statistics") as err:
        parse_kld_output(real_output("perplexity-kld-too-few-tokens.txt"), log_path=Path("eval.log"))
    assert "compared 63 tokens" in str(err.value) and "(full log: eval.log)" in str(err.value)
    assert err.value.exit_code == 4


def test_summary_lost_at_exit_is_recognised():
    lost = real_output("perplexity-kld-summary-lost.txt")
    assert summary_lost(lost)
    assert not summary_lost(real_output("perplexity-kld.txt"))
    assert not summary_lost(real_output("perplexity-kld-too-few-tokens.txt"))  # 63 tokens: none to lose
    with pytest.raises(EvalOutputError, match="lost at exit .* run it again"):
        parse_kld_output(lost)
    # Cut inside the summary: the mean is there, the last lines are not.
    partly = real_output("perplexity-kld.txt").split("====== Token probability statistics")[0]
    assert summary_lost(partly)
    with pytest.raises(EvalOutputError, match="no complete KL-divergence statistics"):
        parse_kld_output(partly)


def test_output_without_a_comparison_is_an_error():
    with pytest.raises(EvalOutputError, match="did not start the comparison") as err:
        parse_kld_output(real_output("perplexity-kld-base-text-too-short.txt"))
    assert "you need at least 512 tokens" in str(err.value)
    # The log of the base run is not a comparison either, though it prints a perplexity.
    with pytest.raises(EvalOutputError, match="did not start the comparison"):
        parse_kld_output(real_output("perplexity-kld-base.txt"))


def test_non_finite_numbers_are_refused():
    text = real_output("perplexity-kld.txt").replace("Mean    KLD:   0.000470", "Mean    KLD:        nan")
    with pytest.raises(EvalOutputError, match="non-finite mean_kld"):
        parse_kld_output(text)


def test_base_logits_args_leave_offload_to_llama_cpp():
    args = build_base_logits_args(CPU, Path("m.gguf"), Path("eval.txt"), Path("base.kld"), chunks=8, context=512)
    assert args == ["/tc/bin/llama-perplexity", "-m", "m.gguf", "-f", "eval.txt", "-c", "512", "--chunks", "8",
                    "--kl-divergence-base", "base.kld"]
    gpu = build_base_logits_args(GPU, Path("m.gguf"), Path("eval.txt"), Path("base.kld"), chunks=8, context=512)
    assert gpu == args  # no -ngl: llama.cpp fits the layers to free GPU memory only when it is unset


def test_kld_args_read_tokens_from_the_base_file():
    args = build_kld_args(CPU, Path("q.gguf"), Path("base.kld"), context=256)
    assert args == ["/tc/bin/llama-perplexity", "-m", "q.gguf", "--kl-divergence-base", "base.kld",
                    "--kl-divergence", "-c", "256"]
    assert "-f" not in args
    assert build_kld_args(GPU, Path("q.gguf"), Path("base.kld"), context=256) == args
    assert build_kld_args(CPU, Path("q.gguf"), Path("base.kld"), context=256, threads=2) == [*args, "-t", "2"]


def test_reference_quantize_args_are_llama_quantize_defaults():
    args = build_reference_quantize_args(CPU, Path("bf16.gguf"), Path("o.gguf"), "Q5_K_M", imatrix=Path("i.gguf"),
                                         threads=4)
    assert args == ["/tc/bin/llama-quantize", "--imatrix", "i.gguf", "bf16.gguf", "o.gguf", "Q5_K_M", "4"]
    plain = build_reference_quantize_args(CPU, Path("b"), Path("o"), "Q4_K_M", imatrix=None, threads=1)
    assert plain == ["/tc/bin/llama-quantize", "b", "o", "Q4_K_M", "1"]


def test_base_logits_size_matches_files_llama_perplexity_wrote():
    # Sizes of the real files behind tests/data: 8 chunks of 256 and 1 chunk of 128, vocabulary 1024.
    assert base_logits_bytes(1024, 256, 8) == 2_097_108
    assert base_logits_bytes(1024, 128, 1) == 130_060


def write_base_logits(path: Path, n_vocab: int = 1024, context: int = 128, chunks: int = 2,
                      cut: int = 0) -> Path:
    header = b"_logits_" + np.array([context], "<u4").tobytes() + np.array([n_vocab, chunks], "<i4").tobytes()
    body = bytes(base_logits_bytes(n_vocab, context, chunks) - len(header) - cut)
    path.write_bytes(header + body)
    return path


def test_reads_the_base_logits_header(tmp_path):
    base = read_base_logits(write_base_logits(tmp_path / "base.kld"))
    assert base == BaseLogits(tmp_path / "base.kld", context=128, n_vocab=1024, chunks=2)


def test_truncated_or_foreign_base_logits_are_refused(tmp_path):
    with pytest.raises(InputError, match="truncated or corrupt: .* needs"):
        read_base_logits(write_base_logits(tmp_path / "cut.kld", cut=10))
    (tmp_path / "foreign.kld").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(InputError, match="not a llama-perplexity base-logits file"):
        read_base_logits(tmp_path / "foreign.kld")
    with pytest.raises(InputError, match="base logits not found"):
        read_base_logits(tmp_path / "missing.kld")


def test_sidecar_records_the_base_model(tmp_path):
    path = write_base_logits(tmp_path / "base.kld")
    sidecar_path(path).write_text(json.dumps({"format": "udquant-base-logits/1", "n_vocab": 1024,
                                              "architecture": "llama", "context_length": 512, "layers": 4,
                                              "embedding_length": 256}))
    base = read_base_logits(path)
    assert (base.architecture, base.context_length, base.layers, base.embedding_length) == ("llama", 512, 4, 256)
    sidecar_path(path).write_text(json.dumps({"format": "udquant-base-logits/1", "n_vocab": 2048}))
    with pytest.raises(InputError, match="does not describe base.kld"):
        read_base_logits(path)


@pytest.mark.parametrize(("facts", "message"), [
    (ModelFacts("llama", 1280, 512), "the vocabulary size is 1024 for the base, 1280 for the quant"),
    (ModelFacts("qwen3", 1024, 512), "the architecture is llama for the base, qwen3 for the quant"),
    (ModelFacts("llama", 1024, 256), "the trained context length is 512 for the base, 256 for the quant"),
    (ModelFacts("llama", 1024, 512, 6, 256),
     r"the layer count \(without MTP layers\) is 4 for the base, 6 for the quant"),
    (ModelFacts("llama", 1024, 512, 4, 320), "the embedding length is 256 for the base, 320 for the quant"),
])
def test_quant_of_another_model_is_refused(facts, message):
    base = BaseLogits(Path("base.kld"), context=128, n_vocab=1024, chunks=2, architecture="llama",
                      context_length=512, layers=4, embedding_length=256)
    with pytest.raises(EvalMismatchError, match=message) as err:
        check_base_fits(base, Path("q.gguf"), facts)
    assert err.value.exit_code == 2 and "q.gguf does not match the base logits base.kld" in str(err.value)
    check_base_fits(base, Path("q.gguf"), ModelFacts("llama", 1024, 512, 4, 256))
    check_base_fits(base, Path("q.gguf"), ModelFacts("llama", 1024, 512))  # a GGUF without them: not compared


def test_eval_context_longer_than_the_quant_was_trained_for_is_refused():
    base = BaseLogits(Path("base.kld"), context=512, n_vocab=1024, chunks=2)  # no sidecar
    with pytest.raises(EvalMismatchError, match="is 512 for the base, 256 for the quant"):
        check_base_fits(base, Path("q.gguf"), ModelFacts("llama", 1024, 256))


def test_model_facts_come_from_the_gguf_header(tmp_path):
    # 5000 tokens: a list the header reader summarises instead of keeping.
    path = write_model(tmp_path / "m.gguf", n_vocab=5000, context_length=256)
    assert read_model_facts(path) == ModelFacts("llama", 5000, 256)
    # The MTP/NextN layer does not count: a quant made without it computes the same logits.
    path = write_model(tmp_path / "mtp.gguf", layers=(5, 1), embedding_length=320)
    assert read_model_facts(path) == ModelFacts("llama", 1024, 512, 4, 320)


@pytest.mark.parametrize(("chunks", "context"), [(0, 512), (MAX_EVAL_CHUNKS + 1, 512), (8, 31), (8, 129)])
def test_eval_settings_are_checked_before_anything_runs(tmp_path, chunks, context):
    with pytest.raises(InputError, match="eval (chunks|context) must be"):
        compute_logits_base(CPU, tmp_path / "m.gguf", tmp_path / "eval.txt", tmp_path / "base.kld",
                            chunks=chunks, context=context, log_path=tmp_path / "eval.log")


def sample_rows() -> list[QuantEval]:
    ud = parse_kld_output(real_output("perplexity-kld.txt"))
    reference = EvalResult(mean_kld=0.00123, mean_kld_stderr=0.00001, kld_p99=0.0042, median_kld=0.001,
                           max_kld=0.01, same_top_p=0.7512, ppl=1110.2, ppl_base=None, ppl_ratio=None,
                           chunks=8, context=256)
    return [QuantEval("UD-Q5_K_XL", 12_345_678, 6.1937, ud, group="UD recipe"),
            QuantEval("Q5_K_M", 2_345_678_901, 5.6712, reference, group="standard")]


def test_card_table():
    assert render_eval_table(sample_rows()) == "\n".join([
        "| Quant | Size | Bits per weight | Mean KLD | 99% KLD | Same top token | PPL ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| UD-Q5_K_XL | 12.3 MB | 6.19 | 0.000470 | 0.000819 | 81.99% | 1.0015 |",
        "| Q5_K_M | 2.35 GB | 5.67 | 0.001230 | 0.004200 | 75.12% | n/a |",
    ])


def test_result_json_record():
    record = sample_rows()[0].describe()
    assert record["label"] == "UD-Q5_K_XL" and record["bits_per_weight"] == 6.1937
    assert record["mean_kld"] == 0.00047 and record["same_top_p"] == 0.81988 and record["chunks"] == 8
    json.dumps(record)


def test_plot_writes_a_png(tmp_path):
    path = plot_kld_vs_bpw(sample_rows(), tmp_path / "kld.png", title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.partial-*"))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_kld_vs_bpw([], tmp_path / "empty.png")


def write_model(path: Path, n_vocab: int = 1024, context_length: int = 512, layers: tuple[int, int] | None = None,
                embedding_length: int | None = None) -> Path:
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(context_length)
    if layers is not None:
        writer.add_block_count(layers[0])
        writer.add_uint32("llama.nextn_predict_layers", layers[1])
    if embedding_length is not None:
        writer.add_embedding_length(embedding_length)
    writer.add_token_list([f"t{i}" for i in range(n_vocab)])
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_perplexity(root: Path, outputs: list[str]) -> Toolchain:
    """A llama-perplexity that prints the given outputs, one per call, and exits 0 (as the real one does)."""
    (root / "bin").mkdir(parents=True)
    for index, text in enumerate(outputs):
        (root / f"output-{index}.txt").write_text(text.split("\n", 1)[1])  # without run_tool's "$ ..." line
    script = root / "bin" / "llama-perplexity"
    script.write_text(f"""#!{sys.executable}
import pathlib, sys
root = pathlib.Path({str(root)!r})
calls = root / "calls"
n = int(calls.read_text()) if calls.exists() else 0
calls.write_text(str(n + 1))
sys.stdout.write((root / f"output-{{n}}.txt").read_text())
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return Toolchain(root, "b11434", "abc", "cpu", "pypi", "d" * 64)


def test_a_run_whose_summary_was_lost_is_repeated(tmp_path):
    toolchain = fake_perplexity(tmp_path / "tc", [real_output("perplexity-kld-summary-lost.txt"),
                                                  real_output("perplexity-kld.txt")])
    base = write_base_logits(tmp_path / "base.kld", n_vocab=1024, context=256, chunks=8)
    result = measure_quant(toolchain, write_model(tmp_path / "q.gguf"), base, log_path=tmp_path / "kld.log")
    assert result.mean_kld == 0.000470 and result.chunks == 8
    assert (tmp_path / "tc" / "calls").read_text() == "2"


def test_a_summary_lost_every_time_is_an_error_not_a_number(tmp_path):
    lost = real_output("perplexity-kld-summary-lost.txt")
    toolchain = fake_perplexity(tmp_path / "tc", [lost] * LOST_SUMMARY_ATTEMPTS)
    base = write_base_logits(tmp_path / "base.kld", n_vocab=1024, context=256, chunks=8)
    with pytest.raises(EvalOutputError, match="printed no complete KL-divergence statistics"):
        measure_quant(toolchain, write_model(tmp_path / "q.gguf"), base, log_path=tmp_path / "kld.log")
    assert (tmp_path / "tc" / "calls").read_text() == str(LOST_SUMMARY_ATTEMPTS)


def test_measure_refuses_before_running_the_tool(tmp_path):
    toolchain = fake_perplexity(tmp_path / "tc", [real_output("perplexity-kld.txt")])
    base = write_base_logits(tmp_path / "base.kld", n_vocab=1024, context=256, chunks=8)
    with pytest.raises(EvalMismatchError, match="vocabulary size is 1024 for the base, 1280 for the quant"):
        measure_quant(toolchain, write_model(tmp_path / "q.gguf", n_vocab=1280), base, log_path=tmp_path / "k.log")
    sidecar_path(base).write_text(json.dumps({"format": "udquant-base-logits/1", "n_vocab": 1024, "layers": 4,
                                              "embedding_length": 256}))
    with pytest.raises(EvalMismatchError, match=r"layer count \(without MTP layers\) is 4 for the base, 6 for"):
        measure_quant(toolchain, write_model(tmp_path / "q6.gguf", layers=(6, 0), embedding_length=256), base,
                      log_path=tmp_path / "k.log")
    assert not (tmp_path / "tc" / "calls").exists()
