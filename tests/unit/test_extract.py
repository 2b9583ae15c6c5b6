import random

from gguf import GGMLQuantizationType as T

from tests.layouts import qwen35_layout
from udquant.extract import extract_recipe, measure_fidelity
from udquant.gguf_header import TensorInfo
from udquant.recipe import is_quantizable, parse_recipe
from udquant.template import TemplateLayout, shard_names

META = {"general.architecture": "qwen35", "qwen35.block_count": 64, "general.file_type": 17}


def template(assign) -> TemplateLayout:
    tensors = []
    for name, shape, dtype in qwen35_layout():
        info = TensorInfo(name, shape, dtype, 0)
        tensors.append(TensorInfo(name, shape, assign(info) if is_quantizable(info) else dtype, 0))
    return TemplateLayout("t.gguf", None, ("t.gguf",), META, tuple(tensors), 10, 10**10)


def irregular(info: TensorInfo) -> T:
    """A UD-like mix: embeddings Q8_0, some layers' attention and ffn_down higher, one odd role."""
    rng = random.Random(info.name)
    if info.name in ("token_embd.weight", "output.weight"):
        return T.Q8_0
    if "ssm_alpha" in info.name or "ssm_beta" in info.name:
        return T.BF16
    if any(r in info.name for r in ("attn_qkv", "attn_v", "ffn_down")):
        return T.Q6_K if rng.random() < 0.3 else T.Q5_K
    if "attn_gate" in info.name and info.name.startswith("blk.1."):
        return T.Q8_0
    return T.Q5_K


def test_extracted_recipe_reproduces_every_tensor():
    layout = template(irregular)
    document = extract_recipe(layout, recipe_id="qwen35/UD-test", level="UD-test")
    recipe = parse_recipe(document, "x")
    fidelity = measure_fidelity(recipe, layout.tensors, layout.metadata)
    assert (fidelity.matched, fidelity.total) == (851, 851)
    assert document["base"] == "Q5_K_M" and document["made_for"]["layers"] == 64
    assert len(document["rules"]) <= 12  # compact: roles grouped, not one rule per tensor
    assert document["rules"][-1] == {"match": ".*", "type": "q5_K"}


def test_uniform_template_is_a_few_rules():
    layout = template(lambda info: T.Q8_0 if "token_embd" in info.name else T.Q4_K)
    document = extract_recipe(layout, recipe_id="x", level="x")
    assert document["rules"] == [{"match": "token_embd\\.weight", "type": "q8_0"}, {"match": ".*", "type": "q4_K"}]


def test_fidelity_reports_mismatches():
    layout = template(irregular)
    uniform = parse_recipe({"id": "u", "arch": "qwen35", "base": "Q5_K_M", "rules": [{"match": ".*", "type": "q5_K"}]},
                           "u")
    fidelity = measure_fidelity(uniform, layout.tensors, layout.metadata)
    assert fidelity.matched < fidelity.total and fidelity.percent < 100
    assert any("token_embd.weight: recipe q5_K, file q8_0" in m for m in fidelity.mismatches)


def test_layer_lists_map_by_relative_depth_to_a_shallower_model():
    layout = template(irregular)
    document = extract_recipe(layout, recipe_id="x", level="x")
    recipe = parse_recipe(document, "x")
    from tests.layouts import header_of
    from udquant.recipe import plan_quantization

    small = header_of(qwen35_layout(n_layers=16))
    small = type(small)(3, {"general.architecture": "qwen35", "qwen35.block_count": 16}, small.tensors, 0, 32)
    plan = plan_quantization(recipe, small)
    by_name = {t.name: t.expected for t in plan.tensors}
    big = {t.name: t.type_name for t in layout.tensors}
    # Layers 4k..4k+3 of 64 sit where layer k of 16 does: a q6_K one among them makes it q6_K.
    for k in range(16):
        span = {big[f"blk.{n}.ffn_down.weight"] for n in range(4 * k, 4 * k + 4)}
        assert by_name[f"blk.{k}.ffn_down.weight"] == ("q6_K" if "q6_K" in span else "q5_K")


def test_shard_names():
    assert shard_names("m-UD-Q5_K_XL-00002-of-00003.gguf") == [
        "m-UD-Q5_K_XL-00001-of-00003.gguf", "m-UD-Q5_K_XL-00002-of-00003.gguf", "m-UD-Q5_K_XL-00003-of-00003.gguf"]
    assert shard_names("m.gguf") == ["m.gguf"]


def test_a_remote_header_shorter_than_its_listed_size_is_an_error_not_a_hang(tmp_path):
    import io
    from contextlib import contextmanager

    import pytest

    from tests.layouts import write_sparse_gguf
    from udquant.errors import InputError
    from udquant.template import _read_remote_header

    path = tmp_path / "t.gguf"
    write_sparse_gguf(path, qwen35_layout(n_layers=2, hidden=256, ffn=512, vocab=1024), arch="qwen35",
                      block_count=2, vocab=1024)
    head = path.read_bytes()[:3000]

    class ShortFiles:
        @contextmanager
        def open(self, *args, **kwargs):
            yield io.BytesIO(head)

    with pytest.raises(InputError, match="header is cut short"):
        _read_remote_header(ShortFiles(), "t.gguf", size=path.stat().st_size)


# -- recipe check / show / refresh: input that cannot be used is refused with what is wrong -------------
def _write_gguf(path, arch: str, kind: str | None = None):
    from tests.layouts import llama_layout, write_sparse_gguf

    if kind is None:
        write_sparse_gguf(path, llama_layout(n_layers=2), arch=arch, block_count=2, vocab=1024)
        return path
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_type(kind)
    writer.add_tensor("blk.0.ffn_down.weight.in_sum2", np.ones(512, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_recipe_for_another_architecture_is_refused(tmp_path):
    import pytest

    from udquant.errors import RecipeError
    from udquant.recipe import load_recipe_ref
    from udquant.recipe_commands import check, report_for_model

    model = _write_gguf(tmp_path / "llama.gguf", "llama")
    for run in (check, lambda m, r: report_for_model(r, m)):
        with pytest.raises(RecipeError, match="recipe qwen35/UD-Q4_K_XL is for architecture qwen35, and "
                                              "llama.gguf is llama") as refused:
            run(model, load_recipe_ref("qwen35/UD-Q4_K_XL"))
        assert refused.value.hint == "use llama/UD-Q4_K_XL or generic/UD-Q4_K_XL"
    assert check(model, load_recipe_ref("llama/UD-Q4_K_XL")).total > 0
    assert report_for_model(load_recipe_ref("generic/UD-Q4_K_XL"), model).counts


def test_a_gguf_that_is_not_a_model_is_refused(tmp_path):
    import pytest

    from udquant.errors import InputError
    from udquant.recipe import load_recipe_ref
    from udquant.recipe_commands import check, report_for_model

    imatrix = _write_gguf(tmp_path / "imatrix.gguf", "llama", kind="imatrix")
    recipe = load_recipe_ref("generic/UD-Q4_K_XL")
    with pytest.raises(InputError, match=r"imatrix.gguf: a GGUF file, but not a model \(general.type='imatrix'\)"):
        report_for_model(recipe, imatrix)
    with pytest.raises(InputError, match="not a model"):
        check(imatrix, recipe)


def test_a_tracked_list_that_cannot_be_used_is_refused_before_any_request(hub, tmp_path):
    import pytest

    from udquant.errors import InputError, RecipeError
    from udquant.recipe_commands import refresh_recipes

    good = "- {recipe: qwen35/UD-Q5_K_XL, repo: unsloth/Tiny-GGUF, file: '*UD-Q5_K_XL*'}\n"
    cases = {
        "rules: {\n  a: [1,\n": (RecipeError, "not valid YAML"),
        "recipe: qwen35/UD-Q5_K_XL\n": (RecipeError, "a YAML list of templates, not a dict"),
        "- qwen35/UD-Q5_K_XL\n": (RecipeError, "entry 1: a mapping with recipe, repo and file"),
        good + "- {recipe: qwen35/UD-Q4_K_XL, repo: unsloth/Tiny-GGUF}\n": (RecipeError, "entry 2: needs file"),
        good + "- {recipe: ../../../etc/x, repo: a/b, file: x}\n": (RecipeError, "is not a library id"),
        good + "- {recipe: qwen35/x, repo: 'not a repo', file: x}\n": (RecipeError, "is not a Hub repo id"),
        good + "- {recipe: qwen35/x, repo: a/b, file: x, revison: main}\n": (RecipeError, "unknown keys revison"),
        good + good: (RecipeError, "qwen35/UD-Q5_K_XL is tracked twice"),
    }
    tracked = tmp_path / "tracked.yaml"
    for text, (kind, message) in cases.items():
        tracked.write_text(text)
        with pytest.raises(kind, match=message) as refused:
            refresh_recipes(tracked)
        assert str(tracked) in refused.value.message
    with pytest.raises(InputError, match="nope.yaml: no such file"):
        refresh_recipes(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="is a directory"):
        refresh_recipes(tmp_path)
    assert hub.state.requests == []
    tracked.write_text("# nothing tracked yet\n")
    assert refresh_recipes(tracked) == []
