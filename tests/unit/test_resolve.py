import json
import math
from pathlib import Path

import pytest

from tests.fakes.hub_models import safetensors_header_only
from udquant.errors import InputError, UnsupportedArchitectureError
from udquant.resolve import resolve_model, validate_repo_id


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    header = safetensors_header_only(shapes)
    data_size = sum(2 * math.prod(shape) for shape in shapes.values())
    path.write_bytes(header + b"\0" * data_size)


def make_model(path: Path, config: dict, shapes: dict[str, list[int]] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    write_safetensors(path / "model.safetensors", shapes or {"model.embed_tokens.weight": [16, 8]})
    return path


def test_local_model_is_described(tmp_path):
    model = resolve_model(str(make_model(tmp_path / "m", {"architectures": ["Qwen3ForCausalLM"]},
                                         {"a": [4, 8], "b": [8]})))
    assert (model.hf_architecture, model.llama_arch, model.n_params) == ("Qwen3ForCausalLM", "qwen3", 40)
    assert model.name == "m" and model.repo_id is None
    assert not model.needs_no_mtp


def test_declared_mtp_without_weights_needs_no_mtp(tmp_path):
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": {"mtp_num_hidden_layers": 1}}
    model = resolve_model(str(make_model(tmp_path / "distill", config)))
    assert model.llama_arch == "qwen35" and model.declared_mtp_layers == 1 and model.needs_no_mtp
    with_mtp = resolve_model(str(make_model(tmp_path / "base", config, {"mtp.fc.weight": [4, 4]})))
    assert not with_mtp.needs_no_mtp


@pytest.mark.parametrize("bad", ["justname", "a/b/c", "-bad/name", "owner/na me", "owner/..x", "o--o/x",
                                 "owner/name.git", "o" * 97 + "/x"])
def test_malformed_repo_ids(bad):
    with pytest.raises(InputError, match="is neither an existing directory nor a Hugging Face repo id"):
        validate_repo_id(bad)


def test_good_repo_id():
    assert validate_repo_id("Qwen/Qwen3.5-27B") == "Qwen/Qwen3.5-27B"


def test_missing_dir(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        resolve_model(str(tmp_path / "nope"))


def test_no_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        resolve_model(str(tmp_path / "m"))


def test_unsupported_architecture_lists_supported(tmp_path):
    with pytest.raises(UnsupportedArchitectureError) as err:
        resolve_model(str(make_model(tmp_path / "m", {"architectures": ["BertModel"]})))
    assert "'BertModel' is not supported" in str(err.value)
    assert "LlamaForCausalLM" in str(err.value) and "Qwen3_5ForCausalLM" in str(err.value)


def test_no_safetensors(tmp_path):
    path = make_model(tmp_path / "m", {"architectures": ["LlamaForCausalLM"]})
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=r"no \*.safetensors weights .* \(found pytorch_model.bin\)"):
        resolve_model(str(path))


def test_broken_config_and_weights(tmp_path):
    path = make_model(tmp_path / "m", {"architectures": ["LlamaForCausalLM"]})
    (path / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        resolve_model(str(path))
    (path / "config.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        resolve_model(str(path))
    (path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="names no architecture"):
        resolve_model(str(path))
