"""The README's first command: `make demo` runs `udquant demo`, offline, on the bundled tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import run_cli
from udquant.gguf_header import read_gguf_header

pytestmark = pytest.mark.e2e


def test_makefile_demo_is_the_command_tested_here():
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert re.search(r"^\t\$\(VENV\)/bin/udquant demo --out-dir udquant-out/demo$", makefile, re.MULTILINE)


def test_demo_makes_a_verified_gguf_offline(toolchain, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("demo", "--out-dir", out, "--work-dir", tmp_path / "work", "--eval", cwd=tmp_path,
                   program="udquant", env={"HF_HUB_OFFLINE": "1", "UDQUANT_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == str(out.resolve())
    assert "UD-Q5_K_XL: " in proc.stderr and "-> verified" in proc.stderr
    (gguf,) = out.glob("*.gguf")
    types = {t.type_name for t in read_gguf_header(gguf).tensors}
    assert {"q8_0", "q6_K", "q5_K", "f32"} <= types
    result = json.loads((out / "udquant-result.json").read_text())
    assert result["imatrix"]["source"] == "computed"
    assert [row["label"] for row in result["eval"]] == ["UD-Q5_K_XL", "Q5_K_M (standard)"]
    assert (result["eval_text"]["chunks"], result["eval_text"]["context"]) == (4, 256)
