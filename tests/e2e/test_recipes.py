"""Recipes extracted from a real template GGUF made here, applied to another model exactly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import run_cli
from udquant.gguf_header import read_gguf_header
from udquant.tiny_model import TinySpec

pytestmark = pytest.mark.e2e

# A deliberately irregular per-layer mix, as a UD template would have.
IRREGULAR = """\
id: test/irregular
arch: llama
base: Q4_K_M
provenance: {kind: derived, note: test template}
rules:
  - {match: 'token_embd\\.weight', type: q8_0}
  - {match: 'output\\.weight', type: q6_K}
  - {match: 'blk\\.\\d+\\.ffn_down\\.weight', type: q6_K, layers: [0, 3, 4, 7]}
  - {match: 'blk\\.\\d+\\.attn_v\\.weight', type: q8_0, layers: [1, 6]}
  - {match: 'blk\\.\\d+\\.attn_v\\.weight', type: q5_K}
  - {match: 'blk\\.[25]\\.ffn_up\\.weight', type: q5_K}
  - {match: '.*', type: q4_K}
"""


@pytest.fixture(scope="module")
def template(models, toolchain, tmp_path_factory) -> Path:
    """An 8-layer tiny llama quantized with the irregular mix: the template."""
    root = tmp_path_factory.mktemp("template")
    base = models("tiny-llama-8", TinySpec(arch="llama", num_layers=8, seed=10))
    (root / "irregular.yaml").write_text(IRREGULAR)
    proc = run_cli(base, "--recipe", root / "irregular.yaml", "--imatrix", "none", "--work-dir", root / "work",
                   "--out-dir", root / "out", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return next((root / "out").glob("*.gguf"))


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.type_name for t in read_gguf_header(path).tensors}


def test_extract_then_apply_to_another_model_is_exact(template, models, tmp_path):
    recipe = tmp_path / "extracted.yaml"
    proc = run_cli("recipe", "extract", template, "--level", "UD-test", "-o", recipe, cwd=tmp_path, program="udquant")
    assert proc.returncode == 0, proc.stderr
    assert "fidelity 100 %" in proc.stderr
    document = yaml.safe_load(recipe.read_text())
    assert document["arch"] == "llama" and document["made_for"]["layers"] == 8
    assert document["provenance"]["kind"] == "template"
    assert len(document["rules"]) <= 8
    check = run_cli("recipe", "check", template, recipe, cwd=tmp_path, program="udquant")
    assert check.returncode == 0 and "fidelity: 75/75 tensors (100.0 %)" in check.stdout, check.stdout
    # Same architecture and config, other weights: the distill.
    distill = models("tiny-llama-8-distill", TinySpec(arch="llama", num_layers=8, seed=11))
    job = run_cli(distill, "--recipe", recipe, "--work-dir", tmp_path / "work", "--out-dir", tmp_path / "out",
                  "--imatrix-chunks", "4", "--imatrix-context", "128", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    made = next((tmp_path / "out").glob("*.gguf"))
    assert types_of(made) == types_of(template)
    again = run_cli("recipe", "check", made, recipe, cwd=tmp_path, program="udquant")
    assert again.returncode == 0, again.stdout


def test_split_template_reads_every_shard(template, toolchain, tmp_path):
    prefix = tmp_path / "split"
    subprocess.run([toolchain.tool("llama-gguf-split"), "--split", "--split-max-tensors", "30", template, prefix],
                   check=True, capture_output=True)
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) == 3
    whole = run_cli("recipe", "extract", template, "--id", "x", "--level", "x", cwd=tmp_path, program="udquant")
    split = run_cli("recipe", "extract", shards[0], "--id", "x", "--level", "x", cwd=tmp_path, program="udquant")
    assert split.returncode == 0, split.stderr
    whole_rules = yaml.safe_load(whole.stdout)["rules"]
    assert yaml.safe_load(split.stdout)["rules"] == whole_rules
    assert "read 3 header(s)" in split.stderr
    shards[2].unlink()
    missing = run_cli("recipe", "extract", shards[0], cwd=tmp_path, program="udquant")
    assert missing.returncode == 2 and "split-00003-of-00003.gguf is missing" in missing.stderr


def test_check_below_100_percent_fails(template, tmp_path):
    proc = run_cli("recipe", "check", template, "generic/UD-Q5_K_XL", cwd=tmp_path, program="udquant")
    assert proc.returncode == 5
    assert "token_embd.weight: recipe q8_0, file q8_0" not in proc.stdout
    assert "output.weight: recipe q8_0, file q6_K" in proc.stdout


def test_show_with_a_model(template, tmp_path):
    proc = run_cli("recipe", "show", "generic/UD-Q5_K_XL", "--model", template, cwd=tmp_path, program="udquant")
    assert proc.returncode == 0, proc.stderr
    assert "q8_0: 2" in proc.stdout and "bits per weight" in proc.stdout
    assert "blk.N.ffn_down.weight" in proc.stdout


def test_check_and_show_refuse_what_the_recipe_is_not_for(template, tmp_path):
    """A recipe of another architecture, a GGUF that is no model, a path that is no file: exit 2, said why."""
    other = run_cli("recipe", "check", template, "qwen35/UD-Q4_K_XL", cwd=tmp_path, program="udquant")
    assert other.returncode == 2 and "is for architecture qwen35, and" in other.stderr, other.stderr
    assert "fidelity" not in other.stdout
    missing = run_cli("recipe", "show", "generic/UD-Q4_K_XL", "--model", tmp_path / "nope.gguf", cwd=tmp_path,
                      program="udquant")
    assert missing.returncode == 2 and "nope.gguf: no such file" in missing.stderr, missing.stderr
    folder = run_cli("recipe", "check", tmp_path, "generic/UD-Q4_K_XL", cwd=tmp_path, program="udquant")
    assert folder.returncode == 2 and "is a directory" in folder.stderr, folder.stderr
