"""A rerun stopped while it replaces an earlier run's outputs leaves no folder that looks finished but lies."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_output import level_output, model
from udquant import output
from udquant.errors import InputError, UdquantError
from udquant.out_dir import check_out_dir, output_file_names
from udquant.output import ImatrixUse, LevelOutput, sha256_file, write_outputs
from udquant.toolchain import Toolchain

TOOLCHAIN = Toolchain(Path("/tc"), "b11434", "abc", "cpu", "pypi", "d" * 64)


def quant(tmp_path: Path, run: str, level: str) -> LevelOutput:
    """A level as the run named `run` made it: its own file, with its own bytes."""
    (tmp_path / run).mkdir(exist_ok=True)
    made = level_output(tmp_path / run, level)
    made.source.write_bytes(b"GGUF quant " + f"{level} of {run}".encode())
    return made


def write(out: Path, levels: list[LevelOutput], **options: Any) -> None:
    check_out_dir(out, model(), file_names=output_file_names(model(), [lv.level for lv in levels]))
    write_outputs(out, model(), levels, ImatrixUse("none", None), TOOLCHAIN, {}, **options)


def fail_split(gguf: Path) -> list[Path]:
    raise UdquantError(f"llama-gguf-split failed on {gguf.name}")


def interrupt(*args: object, **kwargs: object) -> str:
    raise KeyboardInterrupt


@pytest.mark.parametrize("stop", ["split fails", "interrupted at the card"])
def test_a_rerun_stopped_midway_leaves_no_stale_card_or_result_and_the_next_run_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's notes")
    write(out, [quant(tmp_path, "first", "UD-Q5_K_XL"), quant(tmp_path, "first", "UD-Q4_K_XL")])
    assert (out / "README.md").is_file() and (out / "udquant-result.json").is_file()

    with monkeypatch.context() as patch:
        if stop == "split fails":
            options: dict[str, Any] = {"split": fail_split}
            expected: type[BaseException] = UdquantError
        else:
            patch.setattr(output, "render_card", interrupt)
            options, expected = {}, KeyboardInterrupt
        with pytest.raises(expected):
            write(out, [quant(tmp_path, "second", "UD-Q5_K_XL")], **options)
    assert (out / "M-UD-Q5_K_XL.gguf").read_bytes() == b"GGUF quant UD-Q5_K_XL of second"
    # The first run's card and result described the file just replaced: neither may claim the folder is finished.
    assert not (out / "udquant-result.json").exists()
    assert not (out / "README.md").exists()
    pending = json.loads((out / ".udquant-writing.json").read_text())
    assert {"M-UD-Q4_K_XL.gguf", "M-UD-Q5_K_XL.gguf"} <= set(pending["files"])

    # The next run may still replace every file the first run wrote, though its result JSON is gone.
    write(out, [quant(tmp_path, "third", "UD-Q5_K_XL"), quant(tmp_path, "third", "UD-Q4_K_XL")])
    result = json.loads((out / "udquant-result.json").read_text())
    for level in result["levels"]:
        assert level["sha256"] == sha256_file(out / level["file"])
    assert (out / "M-UD-Q4_K_XL.gguf").read_bytes() == b"GGUF quant UD-Q4_K_XL of third"
    assert result["out_dir_files"] == ["M-UD-Q4_K_XL.gguf", "M-UD-Q4_K_XL.recipe.yaml",
                                       "M-UD-Q5_K_XL.gguf", "M-UD-Q5_K_XL.recipe.yaml"]
    assert "M-UD-Q4_K_XL.gguf" in (out / "README.md").read_text()
    assert not (out / ".udquant-writing.json").exists()
    assert (out / "notes.txt").read_text() == "a user's notes"


def test_a_stopped_run_keeps_its_folder_from_another_models_job(tmp_path: Path) -> None:
    """With the earlier result withdrawn, the stopped run's pending record is what tells whose folder it is."""
    out = tmp_path / "out"
    write(out, [quant(tmp_path, "first", "UD-Q5_K_XL")])
    with pytest.raises(UdquantError):
        write(out, [quant(tmp_path, "second", "UD-Q5_K_XL")], split=fail_split)
    other = replace(model(), source="o/N", name="N", repo_id="o/N")
    with pytest.raises(InputError, match="holds the outputs of a stopped udquant run for o/M, not for o/N"):
        check_out_dir(out, other, file_names=output_file_names(other, ["UD-Q5_K_XL"]))
    write(out, [quant(tmp_path, "third", "UD-Q5_K_XL")])  # the same model's rerun finishes it
