import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from tests.layouts import header_of, llama_layout, qwen35_layout
from udquant.errors import ImatrixMismatchError, InputError
from udquant.imatrix import check_imatrix_fits, read_imatrix


def write_dat(path: Path, entries: dict[str, int], chunks: int = 10, dataset: str = "calib.txt") -> None:
    out = struct.pack("<i", len(entries))
    for name, width in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", chunks, width)
        out += np.ones(width, dtype=np.float32).tobytes()
    out += struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()
    path.write_bytes(out)


def write_gguf_imatrix(path: Path, entries: dict[str, int], *, matrices: int = 1, chunk_size: bool = True,
                       nextn_layers: int = 0) -> None:
    writer = GGUFWriter(str(path), arch="")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["calibration-v1.txt"])
    writer.add_uint32("imatrix.chunk_count", 12)
    if chunk_size:
        writer.add_uint32("imatrix.chunk_size", 512)
    if nextn_layers:  # as llama-imatrix --nextn writes it
        writer.add_uint32("imatrix.n_layer_nextn", nextn_layers)
    for name, width in entries.items():
        writer.add_tensor(f"{name}.in_sum2", np.ones((matrices, width), dtype=np.float32))
        writer.add_tensor(f"{name}.counts", np.ones((matrices, 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


MODEL = header_of(llama_layout())
GOOD = {"blk.0.attn_q.weight": 256, "blk.0.ffn_down.weight": 512} | {f"blk.{i}.attn_k.weight": 256 for i in range(4)}


@pytest.mark.parametrize("fmt", ["dat", "gguf"])
def test_both_formats_read_and_fit(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    (write_dat if fmt == "dat" else write_gguf_imatrix)(path, GOOD)
    imatrix = read_imatrix(path)
    assert imatrix.format == fmt
    assert imatrix.widths == GOOD
    assert imatrix.chunk_count in (10, 12)
    assert imatrix.datasets in (("calib.txt",), ("calibration-v1.txt",))
    check_imatrix_fits(imatrix, MODEL)


def test_width_mismatch_lists_tensors(tmp_path):
    path = tmp_path / "m.dat"
    write_dat(path, {"blk.0.attn_q.weight": 320, "blk.0.ffn_down.weight": 512})
    with pytest.raises(ImatrixMismatchError) as err:
        check_imatrix_fits(read_imatrix(path), MODEL)
    assert "blk.0.attn_q.weight: imatrix width 320, tensor row length 256" in str(err.value)


def test_other_model_is_refused(tmp_path):
    path = tmp_path / "m.dat"
    write_dat(path, {"model.layers.0.mlp.down_proj.weight": 512})
    with pytest.raises(ImatrixMismatchError, match="made for another model"):
        check_imatrix_fits(read_imatrix(path), MODEL)


def test_extra_entries_are_refused(tmp_path):
    path = tmp_path / "m.dat"
    write_dat(path, GOOD | {"blk.9.ffn_down.weight": 512})
    with pytest.raises(ImatrixMismatchError, match="tensors this model lacks"):
        check_imatrix_fits(read_imatrix(path), MODEL)


def test_garbage_and_truncated_files(tmp_path):
    path = tmp_path / "m.dat"
    write_dat(path, GOOD)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match="truncated"):
        read_imatrix(path)
    path.write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(InputError, match="not an imatrix file"):
        read_imatrix(path)
    with pytest.raises(InputError, match="imatrix file not found"):
        read_imatrix(tmp_path / "none.dat")


def test_a_model_gguf_is_not_an_imatrix(tmp_path):
    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match="not an imatrix"):
        read_imatrix(path)


def test_a_gguf_imatrix_without_its_metadata_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf_imatrix(path, GOOD, chunk_size=False)
    with pytest.raises(InputError, match="without imatrix.chunk_size, which llama-quantize b11434 refuses"):
        read_imatrix(path)


@pytest.mark.parametrize(("fmt", "fits"), [("gguf", True), ("gguf", False), ("dat", True), ("dat", False)])
def test_expert_entries_need_a_row_per_expert(tmp_path, fmt, fits):
    moe = header_of([*llama_layout(n_layers=1), ("blk.0.ffn_down_exps.weight", (512, 256, 8), T.BF16)])
    path = tmp_path / f"m.{fmt}"
    if fmt == "gguf":
        write_gguf_imatrix(path, {"blk.0.ffn_down_exps.weight": 512}, matrices=8 if fits else 1)
    else:
        write_dat(path, {"blk.0.ffn_down_exps.weight": 512 * 8 if fits else 512})
    imatrix = read_imatrix(path)
    if fits:
        check_imatrix_fits(imatrix, moe)
        return
    with pytest.raises(ImatrixMismatchError) as err:
        check_imatrix_fits(imatrix, moe)
    assert "blk.0.ffn_down_exps.weight: imatrix holds 512 values, llama-quantize needs 512 x 8" in str(err.value)


def test_an_imatrix_of_a_shallower_model_is_refused(tmp_path):
    """Same tensor widths, two layers more: the last layers would be quantized with no importance data."""
    path = tmp_path / "m.gguf"
    write_gguf_imatrix(path, {f"blk.{i}.{kind}.weight": width for i in range(4)
                              for kind, width in (("attn_q", 256), ("ffn_down", 512))})
    with pytest.raises(ImatrixMismatchError) as err:
        check_imatrix_fits(read_imatrix(path), header_of(llama_layout(n_layers=6)))
    assert "m.gguf has no entries for 2 of this model's layers" in str(err.value)
    assert err.value.tensors == [
        f"blk.{i}: none of its 7 matrices (attn_q, attn_k, attn_v, attn_output, ffn_down, ffn_gate, ffn_up)"
        for i in (4, 5)]
    check_imatrix_fits(read_imatrix(path), header_of(llama_layout(n_layers=4)))


def test_layers_without_entries_by_design_are_not_missing(tmp_path):
    """Norms, convolutions and token_embd never get entries, nor an MTP layer without --nextn; one
    entry in a layer is enough (which matrices a layer multiplies depends on the architecture)."""
    layout = qwen35_layout(n_layers=4, hidden=64, ffn=128, vocab=256)
    layout += [("blk.4.nextn.eh_proj.weight", (128, 64), T.BF16), ("blk.4.attn_q.weight", (64, 128), T.BF16),
               ("blk.4.attn_norm.weight", (64,), T.F32)]
    model = replace(header_of(layout), metadata={"general.architecture": "qwen35", "qwen35.block_count": 5,
                                                 "qwen35.nextn_predict_layers": 1})
    path = tmp_path / "m.gguf"
    write_gguf_imatrix(path, {f"blk.{i}.ffn_down.weight": 128 for i in range(4)})
    check_imatrix_fits(read_imatrix(path), model)
    write_gguf_imatrix(path, {f"blk.{i}.ffn_down.weight": 128 for i in range(3)})
    with pytest.raises(ImatrixMismatchError) as err:
        check_imatrix_fits(read_imatrix(path), model)
    assert [line.split(":")[0] for line in err.value.tensors] == ["blk.3"]


def test_entries_of_mtp_layers_the_conversion_dropped_are_ignored_and_said(tmp_path, caplog):
    """An imatrix made with --nextn on a conversion that kept the MTP layer, used on one made with --no-mtp:
    llama-quantize looks entries up by name and never reads those. Entries past the model in layers that are
    not the imatrix's MTP layers still mark another model."""
    model = header_of(qwen35_layout(n_layers=4, hidden=64, ffn=128, vocab=256))
    main = {f"blk.{i}.ffn_down.weight": 128 for i in range(4)}
    mtp = {"blk.4.nextn.eh_proj.weight": 128, "blk.4.ffn_down.weight": 128}
    path = tmp_path / "m.gguf"
    write_gguf_imatrix(path, main | mtp, nextn_layers=1)
    check_imatrix_fits(read_imatrix(path), model)
    assert "m.gguf holds 2 entries for the MTP layer(s) it was made with" in caplog.text

    write_gguf_imatrix(path, main | mtp)  # no imatrix.n_layer_nextn: a model one layer deeper
    with pytest.raises(ImatrixMismatchError, match="tensors this model lacks"):
        check_imatrix_fits(read_imatrix(path), model)
    deeper = main | {"blk.4.ffn_down.weight": 128, "blk.5.nextn.eh_proj.weight": 128}
    write_gguf_imatrix(path, deeper, nextn_layers=1)  # its MTP layer is blk.5: blk.4 is a layer this model lacks
    with pytest.raises(ImatrixMismatchError) as err:
        check_imatrix_fits(read_imatrix(path), model)
    assert err.value.tensors == ["blk.4.ffn_down.weight"]
