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
