import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.hub_models import safetensors_header_only
from udquant.errors import InputError, UnsupportedArchitectureError
from udquant.resolve import check_mtp_option, resolve_model, validate_repo_id


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
                                 "owner/name.git", "o" * 97 + "/x", "owner/name-", "owner/name.", "owner./name",
                                 "owner/name\n"])  # the Hub's ids end each part in a letter, digit or '_'
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


@pytest.mark.parametrize(("config", "message"), [
    (["LlamaForCausalLM"], "config.json is not a JSON object but a list"),
    ({"architectures": "LlamaForCausalLM"}, "'architectures' must be a list of class names, not 'LlamaForCausalLM'"),
    ({"architectures": [1]}, "'architectures' must be a list of class names"),
    ({"architectures": ["LlamaForCausalLM"], "num_nextn_predict_layers": "one"},
     "config.json: num_nextn_predict_layers must be a whole number of layers, not 'one'"),
    ({"architectures": ["LlamaForCausalLM"], "text_config": {"mtp_num_hidden_layers": 1.5}},
     "config.json: text_config: mtp_num_hidden_layers must be a whole number of layers, not 1.5"),
    ({"architectures": ["LlamaForCausalLM"], "text_config": "none"}, "'text_config' must be a JSON object"),
])
def test_malformed_config_names_the_key(tmp_path, config, message):
    path = make_model(tmp_path / "m", {})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=re.escape(message)) as err:
        resolve_model(str(path))
    assert str(path) in err.value.message


@pytest.mark.parametrize(("header", "message"), [
    ([1, 2], "its header is not a JSON object"),
    ({"w": {"dtype": "BF16", "data_offsets": [0, 2]}}, "the safetensors header's entry for 'w' needs 'shape'"),
    ({"w": {"dtype": "BF16", "shape": [1], "data_offsets": [0]}}, "entry for 'w' needs 'shape' and 'data_offsets'"),
    ({"w": {"dtype": "BF16", "shape": ["1"], "data_offsets": [0, 2]}}, "entry for 'w' needs"),
    ({"w": "BF16"}, "entry for 'w' needs"),
])
def test_malformed_safetensors_header_is_refused(tmp_path, header, message):
    path = make_model(tmp_path / "m", {"architectures": ["LlamaForCausalLM"]})
    data = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(data)) + data + b"\0" * 64)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        resolve_model(str(path))
    assert "model.safetensors" in err.value.message


def test_truncated_safetensors_are_refused_before_the_converter_sees_them(tmp_path):
    path = make_model(tmp_path / "m", {"architectures": ["LlamaForCausalLM"]}, {"a": [16, 8], "b": [16]})
    weights = path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-1])
    with pytest.raises(InputError, match=f"truncated: {len(whole) - 1:,} bytes, its header describes {len(whole):,}"):
        resolve_model(str(path))
    weights.write_bytes(whole + b"\0")  # room to spare is fine
    assert resolve_model(str(path)).n_params == 16 * 8 + 16


def test_a_home_folder_of_no_user_or_an_impossible_name_is_bad_input():
    with pytest.raises(InputError, match="'~nobody_udquant_knows' names no user of this machine"):
        resolve_model("~nobody_udquant_knows/model")
    with pytest.raises(InputError, match="is neither an existing directory nor a Hugging Face repo id"):
        resolve_model("a" * 300)  # too long a name for the file system to say it does not exist


def test_an_output_repo_is_named_in_its_error():
    with pytest.raises(InputError, match=r"--output-repo 'bad repo!!' is not a Hugging Face repo id"):
        validate_repo_id("bad repo!!", "--output-repo")


QWEN35 = "Qwen3_5ForConditionalGeneration"
TEXT = {"model.language_model.embed_tokens.weight": [16, 8]}


@pytest.mark.parametrize("config", [{"architectures": [QWEN35]},  # the key left out, as some distills do
                                    {"architectures": [QWEN35], "text_config": {"mtp_num_hidden_layers": 0}},
                                    {"architectures": ["Qwen3_5ForCausalLM"], "mtp_num_hidden_layers": 0}])
def test_qwen35_without_declared_mtp_needs_no_mtp_unless_weights_hold_mtp_layers(tmp_path, config):
    """The pinned converter counts MTP layers from the weights when the config says none, and fails
    (assert self.opt_num_mtp_layers != 0) when they hold none: only --no-mtp gets it through."""
    model = resolve_model(str(make_model(tmp_path / "distill", config, TEXT)))
    assert model.declared_mtp_layers == 0 and model.supports_mtp and model.needs_no_mtp
    for name in ("mtp.layers.0.mlp.up_proj.weight", "model.language_model.mtp.layers.0.mlp.up_proj.weight"):
        with_layers = resolve_model(str(make_model(tmp_path / name, config, {**TEXT, name: [4, 4]})))
        assert not with_layers.needs_no_mtp
    # mtp.fc alone gives the converter no layer to count.
    only_fc = resolve_model(str(make_model(tmp_path / "fc", config, {**TEXT, "mtp.fc.weight": [4, 4]})))
    assert only_fc.needs_no_mtp


def test_architectures_without_mtp_never_need_no_mtp_and_refuse_it(tmp_path):
    config = {"architectures": ["Qwen3ForCausalLM"], "num_nextn_predict_layers": 1}
    model = resolve_model(str(make_model(tmp_path / "q3", config)))
    assert model.declared_mtp_layers == 1 and not model.supports_mtp and not model.needs_no_mtp
    with pytest.raises(InputError, match="--no-mtp does not apply to Qwen3ForCausalLM") as err:
        check_mtp_option(model, True)
    assert err.value.exit_code == 2
    with pytest.raises(InputError, match="--mtp does not apply to Qwen3ForCausalLM"):  # nothing to keep either
        check_mtp_option(model, False)
    check_mtp_option(model, None)
    qwen35 = resolve_model(str(make_model(tmp_path / "q35", {"architectures": [QWEN35]})))
    check_mtp_option(qwen35, True)
    check_mtp_option(qwen35, False)


def test_cli_refuses_no_mtp_for_llama_before_any_work(tmp_path):
    folder = make_model(tmp_path / "m", {"architectures": ["LlamaForCausalLM"]})
    env = {**os.environ, "UDQUANT_LLAMA_CPP": str(tmp_path / "no-toolchain")}
    done = subprocess.run([str(Path(sys.executable).parent / "udquant-job"), str(folder), "--no-mtp",
                           "--work-dir", str(tmp_path / "work"), "--no-upload"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--no-mtp does not apply to LlamaForCausalLM" in done.stderr
    assert not (tmp_path / "work").exists()


def test_local_name_is_the_given_folders_not_its_target_or_a_snapshot_hash(tmp_path, monkeypatch):
    target = make_model(tmp_path / "llama", {"architectures": ["LlamaForCausalLM"]})
    (tmp_path / "My-Distill-7B").symlink_to(target)
    model = resolve_model(str(tmp_path / "My-Distill-7B"))
    assert model.name == "My-Distill-7B" and model.local_dir == target
    snapshot = tmp_path / "hub" / "models--someone--Distill-8B" / "snapshots" / ("a1" * 20)
    make_model(snapshot, {"architectures": ["LlamaForCausalLM"]})
    assert resolve_model(str(snapshot) + "/").name == "Distill-8B"
    monkeypatch.chdir(snapshot)
    assert resolve_model(".").name == "Distill-8B"
    monkeypatch.chdir(snapshot / "..")
    assert resolve_model(f"../snapshots/{snapshot.name}").name == "Distill-8B"


def test_hub_weights_are_counted_and_fetched_from_the_top_folder_only(hub, tmp_path):
    from udquant.hub import download_model

    config = json.dumps({"architectures": ["LlamaForCausalLM"]}).encode()
    shard = safetensors_header_only({"model.embed_tokens.weight": [16, 8]}) + b"\0" * 256
    index = json.dumps({"metadata": {},
                        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}})
    copy = b"\1" * 4096  # what a trainer leaves beside the final weights
    hub.state.add_repo("someone/Distill", {
        "config.json": config, "model-00001-of-00001.safetensors": shard,
        "model.safetensors.index.json": index.encode(),
        "checkpoint-500/model-00001-of-00001.safetensors": copy,
        "checkpoint-500/model.safetensors.index.json": index.encode(), "original/model.safetensors": copy})
    model = resolve_model("someone/Distill")
    assert model.weights_bytes == len(shard)
    assert model.weight_files == ("model-00001-of-00001.safetensors", "model.safetensors.index.json")
    folder = download_model(model, tmp_path / "download", token=None)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert not [key for key in hub.state.served if "checkpoint-500" in key or "original" in key]


def test_hub_repo_with_weights_only_in_subfolders_is_refused(hub):
    config = json.dumps({"architectures": ["LlamaForCausalLM"]}).encode()
    hub.state.add_repo("someone/Nested", {"config.json": config, "checkpoint-9/model.safetensors": b"x"})
    with pytest.raises(InputError, match=r"no \*.safetensors weights at the top .* checkpoint-9/model.safetensors"):
        resolve_model("someone/Nested")


@pytest.mark.parametrize(("config", "message"), [
    (b"{not json", "someone/Broken: config.json is not valid JSON"),
    (b'["LlamaForCausalLM"]', "config.json is not a JSON object but a list"),
])
def test_hub_repo_with_a_broken_config_is_bad_input(hub, config, message):
    hub.state.add_repo("someone/Broken", {"config.json": config, "model.safetensors": b"x"})
    with pytest.raises(InputError, match=message):
        resolve_model("someone/Broken")


def test_a_gguf_repo_is_bad_input_not_a_hub_failure(hub):
    hub.state.add_repo("someone/Foo-GGUF", {"Foo-Q4_K_M.gguf": b"GGUF" + b"\0" * 100, "README.md": b"# Foo"})
    with pytest.raises(InputError) as err:
        resolve_model("someone/Foo-GGUF")
    assert err.value.exit_code == 2
    assert "someone/Foo-GGUF has no config.json" in err.value.message and "Foo-Q4_K_M.gguf" in err.value.message
    assert "needs the original safetensors model, not a GGUF" in str(err.value.hint)
    hub.state.add_repo("someone/Empty", {"README.md": b"# nothing"})
    with pytest.raises(InputError, match="no config.json: it is not a Hugging Face Transformers checkpoint"):
        resolve_model("someone/Empty")
