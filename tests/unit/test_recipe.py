import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from gguf import GGMLQuantizationType as T

from tests.layouts import header_of, llama_layout, qwen35_layout
from udquant.errors import InputError, RecipeError
from udquant.gguf_header import TensorInfo
from udquant.imatrix import Imatrix
from udquant.job import JobOptions, run_job
from udquant.quantize import check_imatrix_coverage
from udquant.recipe import (
    check_fallbacks,
    find_recipe,
    is_quantizable,
    load_recipe,
    load_recipe_ref,
    parse_recipe,
    plan_quantization,
    use_more_bits,
)


def counts(plan):
    return Counter(t.expected for t in plan.tensors)


def test_generic_ud_q5_on_qwen35_27b_matches_the_hand_made_quant():
    # The known figures of the hand-made UD-Q5_K_XL of a Qwen3.5-27B distill.
    plan = plan_quantization(find_recipe("UD-Q5_K_XL", "qwen35"), header_of(qwen35_layout()))
    assert counts(plan) == {"q8_0": 2, "q6_K": 64, "q5_K": 432, "f32": 353}
    assert len(plan.tensors) == 851


def test_more_bits_layers_follow_llama_cpp_counters():
    plan = plan_quantization(find_recipe("UD-Q5_K_XL", "qwen35"), header_of(qwen35_layout()))
    by_name = {t.name: t.expected for t in plan.tensors}
    # attn_v and attn_qkv share one counter over all 64 layers.
    attn = [by_name.get(f"blk.{i}.attn_qkv.weight") or by_name[f"blk.{i}.attn_v.weight"] for i in range(64)]
    assert attn == ["q6_K" if use_more_bits(i, 64) else "q5_K" for i in range(64)]
    assert [by_name[f"blk.{i}.ffn_down.weight"] for i in range(64)] == attn


def test_use_more_bits_matches_llama_cpp():
    picked = [i for i in range(32) if use_more_bits(i, 32)]
    assert picked == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_every_quantized_tensor_gets_an_anchored_line():
    plan = plan_quantization(find_recipe("UD-Q5_K_XL", "llama"), header_of(llama_layout()))
    lines = plan.tensor_type_lines()
    assert len(lines) == sum(t.quantized for t in plan.tensors) == 30
    for line in lines:
        pattern, _ = line.split("=")
        assert pattern.startswith("^") and pattern.endswith("$")
        # llama-quantize lower-cases patterns: ours must survive that unchanged.
        assert pattern == pattern.lower()
        name = pattern[1:-1].replace("\\", "")
        assert re.search(pattern, name) and not re.search(pattern, "x" + name)
    assert "^blk\\.3\\.attn_v\\.weight$=q6_K" in lines
    assert "^blk\\.0\\.attn_v\\.weight$=q5_K" in lines


def test_norms_and_conv_keep_their_source_type():
    plan = plan_quantization(find_recipe("UD-Q5_K_XL", "qwen35"), header_of(qwen35_layout(n_layers=4)))
    by_name = {t.name: t for t in plan.tensors}
    for name in ("blk.0.ssm_conv1d.weight", "blk.0.attn_norm.weight", "blk.0.ssm_a", "output_norm.weight"):
        assert not by_name[name].quantized and by_name[name].expected == "f32"


def test_odd_width_predicts_fallback_unless_declared(tmp_path):
    header = header_of(llama_layout(hidden=320, ffn=640))
    recipe = find_recipe("UD-Q5_K_XL", "llama")
    plan = plan_quantization(recipe, header)
    bad = plan.undeclared_fallbacks()
    assert {t.wanted for t in bad} == {"q5_K", "q6_K"}
    assert all(t.expected == t.wanted for t in bad)
    data = yaml.safe_load(recipe.source_path.read_text())
    data["fallbacks"] = {"q5_K": "q5_1", "q6_K": "q8_0"}
    declared = plan_quantization(parse_recipe(data, "test"), header)
    assert declared.undeclared_fallbacks() == []
    assert counts(declared)["q5_1"] > 0


@pytest.mark.parametrize(("change", "message"), [
    ({"rules": [{"match": "blk\\.(", "type": "q5_K"}]}, "invalid regular expression"),
    ({"rules": [{"match": "(a+)+b", "type": "q5_K"}]}, "repeats a repetition"),
    ({"rules": [{"match": "blk\\.(\\d*)*\\.weight", "type": "q5_K"}]}, "repeats a repetition"),
    ({"rules": [{"match": "(x|.*)+", "type": "q5_K"}]}, "repeats a repetition"),
    ({"rules": [{"match": "blk\\.1\\.x", "type": "q5_K"}], "level": "a/b"}, "level 'a/b' must be"),
    ({"rules": [{"match": ".*", "type": "q9_K"}]}, "unknown ggml type 'q9_K'"),
    ({"rules": [{"match": ".*", "type": "q8_K"}]}, "llama-quantize cannot write q8_K tensors"),
    ({"base": "Q7_K_M"}, "base 'Q7_K_M' is not a llama-quantize type"),
    ({"rules": [{"match": ".*", "type": "q5_K", "select": "some"}]}, "select must be one of"),
    ({"rules": [{"match": ".*", "type": "q5_K", "layers": "1,2"}]}, "layers must be a list"),
    ({"rules": []}, "rules must be a non-empty list"),
    ({"rules": [{"type": "q5_K"}]}, "each rule needs 'match' and 'type'"),
])
def test_invalid_recipes_are_rejected(change, message):
    data = {"id": "t", "arch": "any", "base": "Q5_K_M", "rules": [{"match": ".*", "type": "q5_K"}]} | change
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_recipe(data, "test.yaml")


def test_missing_keys_are_named():
    with pytest.raises(RecipeError, match="missing arch, base"):
        parse_recipe({"id": "t", "rules": []}, "test.yaml")


@pytest.mark.parametrize("last", [{"match": "blk\\..*", "type": "q5_K"},
                                  {"match": ".*", "type": "q5_K", "layers": [0]},
                                  {"match": ".*", "type": "q5_K", "select": "more_bits"}])
def test_recipes_without_a_catch_all_are_rejected_when_loaded(last):
    # On load, not after a download and a BF16 conversion of tens of GB.
    with pytest.raises(RecipeError, match="the last rule must be a catch-all"):
        parse_recipe({"id": "t", "arch": "any", "base": "Q5_K_M", "rules": [last]}, "t.yaml")


def _rules(*rules):
    return parse_recipe({"id": "t", "arch": "qwen35", "base": "Q5_K_M", "made_for": {"layers": 64},
                         "rules": [*rules, {"match": ".*", "type": "q5_K"}]}, "t.yaml")


def _qwen35(n_layers, tied=False):
    header = header_of(qwen35_layout(n_layers=n_layers, hidden=1024, ffn=3072, vocab=4096, tied=tied))
    return type(header)(3, {"general.architecture": "qwen35", "qwen35.block_count": n_layers}, header.tensors, 0, 32)


def _layers_of(plan, role, type_name):
    return sorted(int(t.name.split(".")[1]) for t in plan.tensors
                  if t.name.endswith(f".{role}.weight") and t.expected == type_name)


@pytest.mark.parametrize(("depth", "attn_v", "ffn_down"), [
    (64, [3, 7, 63], [1, 3, 5]),
    (32, [3, 31], [0, 1, 2]),  # attention sits on every 4th layer: 3 and 7 both land on 3
    (24, [3, 23], [0, 1, 2]),
    (128, [7, 15, 127], [2, 3, 6, 7, 10, 11]),  # a deeper model: each listed layer's whole span
])
def test_layer_lists_land_on_layers_of_their_role_at_any_depth(depth, attn_v, ffn_down):
    recipe = _rules({"match": "blk\\.\\d+\\.attn_v\\.weight", "type": "q8_0", "layers": [3, 7, 63]},
                    {"match": "blk\\.\\d+\\.ffn_down\\.weight", "type": "q6_K", "layers": [1, 3, 5]})
    plan = plan_quantization(recipe, _qwen35(depth))
    assert _layers_of(plan, "attn_v", "q8_0") == attn_v
    assert _layers_of(plan, "ffn_down", "q6_K") == ffn_down


def test_a_tied_embedding_takes_the_output_rule_when_it_has_more_bits():
    recipe = _rules({"match": "token_embd\\.weight", "type": "q4_K"}, {"match": "output\\.weight", "type": "q6_K"})
    types = {t.name: t.expected for t in plan_quantization(recipe, _qwen35(4, tied=True)).tensors}
    assert types["token_embd.weight"] == "q6_K" and "output.weight" not in types
    untied = {t.name: t.expected for t in plan_quantization(recipe, _qwen35(4)).tensors}
    assert (untied["token_embd.weight"], untied["output.weight"]) == ("q4_K", "q6_K")
    # The catch-all is no output rule, and fewer bits never win.
    only_embd = _rules({"match": "token_embd\\.weight", "type": "q8_0"}, {"match": "output\\.weight", "type": "q6_K"})
    assert {t.name: t.expected for t in plan_quantization(only_embd, _qwen35(4, tied=True)).tensors}[
        "token_embd.weight"] == "q8_0"


def test_more_bits_counts_tensors_an_earlier_rule_claimed():
    # llama.cpp counts every ffn_down: one claimed by an earlier rule must not shift the others.
    library = find_recipe("UD-Q5_K_XL", "qwen35")
    data = yaml.safe_load(library.source_path.read_text())
    data["rules"].insert(0, {"match": "blk\\.30\\.ffn_down\\.weight", "type": "q8_0"})
    header = header_of(qwen35_layout())
    before = {t.name: t.expected for t in plan_quantization(library, header).tensors}
    after = {t.name: t.expected for t in plan_quantization(parse_recipe(data, "t"), header).tensors}
    assert {name for name in before if before[name] != after[name]} == {"blk.30.ffn_down.weight"}


def test_layer_lists_pick_exact_layers():
    recipe = parse_recipe({"id": "t", "arch": "any", "base": "Q4_K_M", "rules": [
        {"match": "blk\\.\\d+\\.ffn_down\\.weight", "type": "q8_0", "layers": [1, 3]},
        {"match": ".*", "type": "q4_K"}]}, "t.yaml")
    plan = plan_quantization(recipe, header_of(llama_layout()))
    high = sorted(t.name for t in plan.tensors if t.expected == "q8_0")
    assert high == ["blk.1.ffn_down.weight", "blk.3.ffn_down.weight"]


def test_unknown_level_lists_the_library():
    with pytest.raises(RecipeError, match="levels in the library: .*UD-Q5_K_XL"):
        find_recipe("UD-Q9", "llama")


@pytest.mark.parametrize("level", ["../llama/UD-Q4_K_XL", "UD-Q4_K_XL/../../x", ".hidden", ""])
def test_level_names_cannot_reach_outside_the_library(level):
    with pytest.raises(InputError, match="is not a level name"):
        find_recipe(level, "generic")


@pytest.mark.parametrize("ref", ["generic/../llama/UD-Q4_K_XL", "../recipes/llama/UD-Q4_K_XL",
                                 "owner/llama/UD-Q4_K_XL"])
def test_library_ids_are_arch_slash_level_only(ref):
    with pytest.raises(RecipeError, match="no recipe file or library id"):
        load_recipe_ref(ref)
    assert load_recipe_ref("llama/UD-Q4_K_XL").level == "UD-Q4_K_XL"


def test_a_recipe_refuses_quant_levels_other_than_its_own_even_the_default_level(tmp_path: Path):
    """--quant UD-Q5_K_XL (the default level) given with a UD-Q4_K_XL recipe is refused, not taken for "not
    given"; without --quant the recipe's level is made. Both are decided before the model is looked at."""
    options = JobOptions(source=str(tmp_path / "no-model"), recipe="llama/UD-Q4_K_XL", work_dir=tmp_path / "work")
    for levels in [("UD-Q5_K_XL",), ("UD-Q4_K_XL", "UD-Q5_K_XL")]:
        with pytest.raises(InputError, match="--recipe llama/UD-Q4_K_XL makes UD-Q4_K_XL, and --quant asks for "
                                             f"{', '.join(levels)}"):
            run_job(replace(options, levels=levels))
    for levels in [None, ("UD-Q4_K_XL",)]:
        with pytest.raises(InputError, match="no such directory"):  # past the recipe check, on to the model
            run_job(replace(options, levels=levels))


def test_recipe_file_errors(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_every_library_recipe_loads():
    from udquant.library import recipes_dir

    paths = sorted(recipes_dir().glob("*/*.yaml"))
    assert paths
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.provenance.get("kind") in ("derived", "template"), path
        plan_quantization(recipe, header_of(llama_layout()))


def test_source_types_other_than_bf16_are_kept_for_unquantized():
    layout = llama_layout()
    layout.append(("blk.0.ffn_gate_inp.weight", (256, 8), T.F16))
    plan = plan_quantization(find_recipe("UD-Q5_K_XL", "llama"), header_of(layout))
    gate = next(t for t in plan.tensors if t.name == "blk.0.ffn_gate_inp.weight")
    assert not gate.quantized and gate.expected == "f16"


def one_type(type_name: str, **extra):
    return parse_recipe({"id": "t", "arch": "any", "base": "Q5_K_M",
                         "rules": [{"match": ".*", "type": type_name}], **extra}, "test.yaml")


def test_undeclared_fallbacks_are_refused_before_quantizing():
    header = header_of(llama_layout(hidden=320, ffn=640))
    with pytest.raises(RecipeError, match=r"blk\.0\.attn_q\.weight: q5_K on rows of 320 -> q5_1") as err:
        check_fallbacks(plan_quantization(find_recipe("UD-Q5_K_XL", "llama"), header))
    assert "fallbacks: {q5_K: q5_1, q6_K: q8_0}" in str(err.value.hint)
    check_fallbacks(plan_quantization(find_recipe("UD-Q5_K_XL", "llama"), header_of(llama_layout())))


def test_fallbacks_follow_llama_quantize_beyond_k_quants():
    header = header_of(llama_layout(hidden=320, ffn=640))
    plan = plan_quantization(one_type("tq2_0"), header)
    assert {t.written for t in plan.tensors if t.quantized} == {"q4_0"}
    with pytest.raises(RecipeError, match="has no fallback for it and would stop"):
        plan_quantization(one_type("q1_0"), header)  # block 128: llama-quantize throws


def test_upper_case_tensor_names_cannot_get_a_type():
    layout = llama_layout()
    layout.append(("blk.0.Extra.weight", (256, 256), T.BF16))
    with pytest.raises(RecipeError, match="blk.0.Extra.weight has upper-case letters"):
        plan_quantization(one_type("q5_K"), header_of(layout))


def test_imatrix_needs_follow_what_llama_quantize_writes():
    # A type that falls back to iq4_nl needs no entries.
    plan = plan_quantization(one_type("iq2_xxs"), header_of(llama_layout(n_layers=1, hidden=256, ffn=1152)))
    # Left: token_embd, output, attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up (ffn_down's rows of 1152
    # make it iq4_nl).
    with pytest.raises(RecipeError, match=r"asks for iq2_xxs on 8 tensors without imatrix entries"):
        check_imatrix_coverage(plan, None)
    # llama-quantize exempts the embeddings and the output from its check, but ggml cannot write IQ1_S, IQ2_XXS
    # or IQ2_XS without importance data at all (it aborts mid-file): those need entries there too.
    for low_bit, refused in [("iq2_xxs", True), ("iq2_xs", True), ("iq1_s", True), ("iq3_xxs", False),
                             ("iq2_s", False), ("iq1_m", False)]:
        embeddings_only = parse_recipe({"id": "t", "arch": "any", "base": "Q5_K_M", "rules": [
            {"match": "token_embd\\.weight|output\\.weight", "type": low_bit}, {"match": ".*", "type": "q5_K"}]},
            "test.yaml")
        plan = plan_quantization(embeddings_only, header_of(llama_layout()))
        if not refused:
            check_imatrix_coverage(plan, None)
            continue
        with pytest.raises(RecipeError, match=rf"asks for {low_bit} on 2 tensors without imatrix entries") as err:
            check_imatrix_coverage(plan, None)
        assert "token_embd.weight, output.weight never get imatrix entries" in str(err.value.hint)
        # Known before udquant computes its imatrix (entries for blk.* only), not after hours of llama-imatrix.
        with pytest.raises(RecipeError, match=rf"asks for {low_bit} on 2 tensors without imatrix entries"):
            check_imatrix_coverage(plan, None, to_compute=True)
        # An imatrix made with --process-output (and a tied token_embd) has those entries: it is accepted.
        full = Imatrix(Path("i.gguf"), "gguf", {"token_embd.weight": 256, "output.weight": 256}, (), 1, 512,
                       {"token_embd.weight": 256, "output.weight": 256})
        check_imatrix_coverage(plan, full)
    blocks_only = plan_quantization(one_type("iq2_xxs"), header_of(llama_layout(n_layers=1, hidden=256, ffn=1152)))
    with pytest.raises(RecipeError, match="on 2 tensors without imatrix entries, e.g. token_embd.weight, output"):
        check_imatrix_coverage(blocks_only, None, to_compute=True)  # the 6 blk.* tensors it will cover


@pytest.mark.parametrize(("name", "shape", "arch", "quantized"), [
    ("blk.0.ffn_up.weight", (256, 512), "llama", True),
    ("blk.0.ffn_up.weight", (256, 1), "llama", False),  # ggml_n_dims ignores trailing 1s
    ("blk.0.ffn_up_exps.weight", (256, 512, 8), "qwen3moe", True),
    ("blk.0.time_mix_key.weight", (256, 256), "rwkv7", True),  # not one of RWKV's small ones
    ("blk.0.time_mix_w1.weight", (256, 256), "rwkv7", False),
    ("v.blk.0.patch_merger.weight", (256, 256), "clip", False),
    ("position_embd.weight", (256, 512), "bert", False),
    ("v.position_embd.weight", (256, 512), "clip", False),
    ("blk.0.attn_k_b.weight", (256, 256), "glm5-next", False),
    ("blk.0.attn_k_b.weight", (256, 256), "deepseek2", True),
])
def test_quantizable_tensors_follow_llama_quantize(name, shape, arch, quantized):
    assert is_quantizable(TensorInfo(name, shape, T.BF16, 0), arch) is quantized
