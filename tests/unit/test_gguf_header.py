from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from udquant.errors import CorruptGGUFError, InputError
from udquant.gguf_header import NeedMoreBytes, SkippedArray, ggml_type_name, parse_gguf_header, read_gguf_header


def write_sample(path: Path) -> None:
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list([f"tok{i}" for i in range(5000)])  # long: summarised, not kept
    writer.add_array("test.small", [1, 2, 3])
    writer.add_string("test.name", "tiny")
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(256, dtype=np.float32))
    weights = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_up.weight", quantize(weights, GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", weights.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reads_metadata_and_tensor_table(tmp_path):
    path = tmp_path / "m.gguf"
    write_sample(path)
    header = read_gguf_header(path)
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["test.small"] == [1, 2, 3]
    assert header.metadata["test.name"] == "tiny"
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, SkippedArray) and tokens.length == 5000
    by_name = {t.name: t for t in header.tensors}
    assert by_name["blk.0.ffn_up.weight"].shape == (256, 4)
    assert by_name["blk.0.ffn_up.weight"].type_name == "q8_0"
    assert by_name["token_embd.weight"].type_name == "f16"
    assert header.data_offset + header.data_size == path.stat().st_size


def test_prefix_too_short_asks_for_more(tmp_path):
    path = tmp_path / "m.gguf"
    write_sample(path)
    data = path.read_bytes()
    with pytest.raises(NeedMoreBytes) as need:
        parse_gguf_header(data[:1000])
    assert need.value.needed > 1000
    header = parse_gguf_header(data[: read_gguf_header(path).data_offset])
    assert len(header.tensors) == 3


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "m.gguf"
    write_sample(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptGGUFError, match="truncated: tensor data needs"):
        read_gguf_header(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CorruptGGUFError, match="bad magic"):
        read_gguf_header(path)
    path.write_bytes(b"GGUF\x03\0\0\0" + b"\xff" * 8)
    with pytest.raises(CorruptGGUFError, match="cut short"):
        read_gguf_header(path)


def test_a_path_that_is_no_file_is_the_users_mistake_not_a_corrupt_gguf(tmp_path):
    """Missing or a directory: exit 2 with what is wrong, not 'delete it and run again' (exit 6)."""
    with pytest.raises(InputError, match="nope.gguf: no such file") as missing:
        read_gguf_header(tmp_path / "nope.gguf")
    assert not isinstance(missing.value, CorruptGGUFError)
    with pytest.raises(InputError, match="is a directory") as folder:
        read_gguf_header(tmp_path)
    assert not isinstance(folder.value, CorruptGGUFError)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InputError, match="cannot be opened"):
        read_gguf_header(tmp_path / "file" / "m.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")  # an existing file that is no GGUF stays corrupt
    with pytest.raises(CorruptGGUFError):
        read_gguf_header(tmp_path / "empty.gguf")


def test_type_names_are_llama_cpp_spelling():
    assert ggml_type_name(GGMLQuantizationType.Q6_K) == "q6_K"
    assert ggml_type_name(GGMLQuantizationType.IQ2_XXS) == "iq2_xxs"
    assert ggml_type_name(GGMLQuantizationType.BF16) == "bf16"
