"""The job against the local Hub test server through the real huggingface_hub client:
resolve, imatrix discovery, download, upload in one commit, and the token kept secret."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.e2e.conftest import run_cli
from udquant.gguf_header import read_gguf_header
from udquant.library import data_file
from udquant.tiny_model import TinySpec

pytestmark = pytest.mark.e2e
TOKEN = "hf_test_token_owner"
DISTILL = "someone/Tiny-Distill"


@pytest.fixture(scope="module")
def imatrices(llama, odd_llama, toolchain, tmp_path_factory) -> dict[str, Path]:
    """Real imatrix files of the tiny llama (GGUF and legacy .dat) and of another model."""
    root = tmp_path_factory.mktemp("imatrices")
    (root / "calibration.txt").write_text(data_file("calibration.txt").read_text())
    converter_env = {**os.environ, "PYTHONPATH": str(toolchain.converter.parent / "gguf-py")}
    made = {}
    for name, model, fmt in (("gguf", llama, "gguf"), ("dat", llama, "dat"), ("other", odd_llama, "gguf")):
        bf16 = root / f"{name}-bf16.gguf"
        subprocess.run([sys.executable, toolchain.converter, model, "--outtype", "bf16", "--outfile", bf16],
                       check=True, capture_output=True, env=converter_env)
        out = root / f"{name}.imatrix.{fmt}"
        subprocess.run([toolchain.tool("llama-imatrix"), "-m", bf16, "-f", "calibration.txt", "-o", out.name,
                        "--output-format", fmt, "-c", "128", "--chunks", "4", "--no-ppl"], check=True,
                       capture_output=True, cwd=root)
        made[name] = out
    return made


def add_distill(hub, model_dir: Path, *, gated: bool = False) -> None:
    files = {p.name: p for p in model_dir.iterdir() if p.is_file()}
    hub.state.add_repo(DISTILL, files, gated=gated, card_data={"base_model": "base-org/Tiny-Base",
                                                               "license": "apache-2.0"})
    hub.state.add_repo("base-org/Tiny-Base", {"README.md": b"# base"}, card_data={})


def job(*args, cwd: Path, token: str | None = TOKEN):
    env = {"HF_TOKEN": token} if token else {}
    return run_cli(DISTILL, "--work-dir", cwd / "work", "--out-dir", cwd / "out", *args, cwd=cwd, env=env)


def test_upload_in_one_commit_and_the_token_stays_secret(hub, llama, imatrices, toolchain, tmp_path):
    add_distill(hub, llama, gated=True)
    hub.state.add_repo("mradermacher/Tiny-Distill-i1-GGUF", {"Tiny-Distill.imatrix.gguf": imatrices["gguf"]})
    proc = job(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    url = f"{hub.url}/tester/Tiny-Distill-UD-GGUF"
    assert proc.stdout.strip().splitlines()[-1] == url
    repo = hub.state.repos["tester/Tiny-Distill-UD-GGUF"]
    assert len(repo.commits) == 1
    assert set(repo.commits[0]["paths"]) == {"Tiny-Distill-UD-Q5_K_XL.gguf", "Tiny-Distill-UD-Q5_K_XL.recipe.yaml",
                                             "README.md", "udquant-result.json"}
    result = json.loads(repo.files["udquant-result.json"].data)
    assert result["inputs"]["revision"] == hub.state.repos[DISTILL].sha
    assert result["imatrix"]["source"] == "hub" and result["imatrix"]["origin"] == "mradermacher"
    assert result["imatrix"]["is_base_model_imatrix"] is False
    assert result["output_repo"] == "tester/Tiny-Distill-UD-GGUF"
    card = ModelCard(repo.files["README.md"].data.decode())
    assert card.data.base_model == DISTILL and card.data.base_model_relation == "quantized"
    assert "llama-cli -hf tester/Tiny-Distill-UD-GGUF:UD-Q5_K_XL" in card.text
    assert "mradermacher/Tiny-Distill-i1-GGUF" in card.text
    # Only what the converter needs was downloaded, and with the token (the repo is gated).
    downloads = [path for method, path, _ in hub.state.requests if method == "GET" and "/resolve/" in path]
    assert all(DISTILL not in p or p.rsplit("/", 1)[1] in {f.name for f in llama.iterdir()} for p in downloads)
    # The token never shows: not in output, logs, card, result, recipe or GGUF metadata.
    assert TOKEN not in proc.stdout + proc.stderr
    for path in [*tmp_path.rglob("*")]:
        if path.is_file() and path.suffix != ".gguf":
            assert TOKEN not in path.read_text(errors="replace"), path
    for gguf in (tmp_path / "out").glob("*.gguf"):
        assert TOKEN not in json.dumps(read_gguf_header(gguf).metadata, default=str)
    commits = [{k.lower(): v for k, v in h.items()} for m, p, h in hub.state.requests if "/commit/" in p]
    assert commits and all(h.get("authorization") == f"Bearer {TOKEN}" for h in commits)
    # A rerun with identical files uploads nothing.
    again = job(cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already up to date, nothing uploaded" in again.stderr
    assert len(repo.commits) == 1


def test_upload_settings_that_would_fail_or_leak_are_refused_before_any_work(hub, llama, tmp_path):
    add_distill(hub, llama)
    hub.state.tokens["hf_test_token_reader"] = "tester"
    hub.state.read_only_tokens.add("hf_test_token_reader")
    proc = job(cwd=tmp_path, token="hf_test_token_reader")
    assert proc.returncode == 2 and "the token in HF_TOKEN is read-only" in proc.stderr
    # --private cannot make an existing public repo private: publishing there would expose the files.
    hub.state.add_repo("tester/Tiny-Distill-UD-GGUF", {"README.md": b"# mine"})
    proc = job("--private", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--private, but tester/Tiny-Distill-UD-GGUF already exists and is public" in proc.stderr
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").glob("convert-*"))
    assert hub.state.repos["tester/Tiny-Distill-UD-GGUF"].commits == []
    hub.state.repos["tester/Tiny-Distill-UD-GGUF"].private = True
    # A repo of the default name that udquant did not make is written only when named.
    proc = job("--private", "--quant", "UD-Q4_K_XL", "--imatrix", "none", cwd=tmp_path)
    assert proc.returncode == 2 and "tester/Tiny-Distill-UD-GGUF already exists and was not made by udquant" \
        in proc.stderr
    proc = job("--private", "--quant", "UD-Q4_K_XL", "--imatrix", "none", "--output-repo",
               "tester/Tiny-Distill-UD-GGUF", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(hub.state.repos["tester/Tiny-Distill-UD-GGUF"].commits) == 1


def test_repos_of_other_models_and_foreign_namespaces_are_never_written(hub, llama, tmp_path):
    add_distill(hub, llama)
    other = {"udquant-result.json": json.dumps({"inputs": {"source": "otherorg/Tiny-Distill"}}).encode(),
             "Tiny-Distill-UD-Q5_K_XL.gguf": b"theirs"}
    hub.state.add_repo("tester/Tiny-Distill-UD-GGUF", other)
    proc = job(cwd=tmp_path)
    assert proc.returncode == 2
    assert "holds udquant's quants of otherorg/Tiny-Distill, not of someone/Tiny-Distill" in proc.stderr
    proc = job("--output-repo", "meta-llama/Stolen-UD-GGUF", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot create or write meta-llama/Stolen-UD-GGUF" in proc.stderr
    assert not list((tmp_path / "work").glob("convert-*"))  # refused before any work
    assert hub.state.repos["tester/Tiny-Distill-UD-GGUF"].commits == []
    # An organization the user belongs to is fine, unless only with the read role.
    hub.state.orgs["tester"] = ["team", "readers"]
    hub.state.read_only_orgs.add("readers")
    proc = job("--output-repo", "readers/Tiny-Distill-UD-GGUF", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot create or write readers/Tiny-Distill-UD-GGUF" in proc.stderr
    proc = job("--output-repo", "team/Tiny-Distill-UD-GGUF", "--imatrix", "none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "team/Tiny-Distill-UD-GGUF" in hub.state.repos
    # A fine-grained token writes only where its scopes let it, and is refused before any work elsewhere.
    hub.state.tokens["hf_test_token_fine"] = "tester"
    hub.state.fine_grained["hf_test_token_fine"] = [
        {"entity": {"type": "org", "name": "team"}, "permissions": ["repo.content.read", "repo.write"]}]
    proc = job("--output-repo", "tester/Mine-UD-GGUF", cwd=tmp_path, token="hf_test_token_fine")
    assert proc.returncode == 2 and "fine-grained token in HF_TOKEN may not write tester/Mine-UD-GGUF" in proc.stderr
    assert "tester/Mine-UD-GGUF" not in hub.state.repos
    proc = job("--output-repo", "team/Tiny-Distill-UD-GGUF", "--imatrix", "none", "--quant", "UD-Q4_K_XL",
               cwd=tmp_path, token="hf_test_token_fine")
    assert proc.returncode == 0, proc.stderr
    assert len(hub.state.repos["team/Tiny-Distill-UD-GGUF"].commits) == 2


def test_the_repo_holds_what_its_card_describes_across_reruns(hub, llama, tmp_path):
    add_distill(hub, llama)
    repo_id = "tester/Tiny-Distill-UD-GGUF"
    proc = job("--imatrix", "none", "--split-size-gb", "0.0005", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    repo = hub.state.repos[repo_id]
    shards = sorted(name for name in repo.files if name.endswith(".gguf"))
    assert len(shards) >= 2 and all(re.fullmatch(r"Tiny-Distill-UD-Q5_K_XL-\d{5}-of-\d{5}\.gguf", s) for s in shards)
    card = ModelCard(repo.files["README.md"].data.decode())
    assert f"`{shards[0]}` ({len(shards)} parts)" in card.text and "UD-Q5_K_XL.gguf`" not in card.text
    assert card.data.license == "apache-2.0"  # the distill's license goes along
    assert "applied without an importance matrix" in card.text and "**this** model" not in card.text
    result = json.loads(repo.files["udquant-result.json"].data)
    assert result["levels"][0]["parts"] == shards
    # The converter names the model after the distill, not after its download folder.
    assert read_gguf_header(tmp_path / "out" / "Tiny-Distill-UD-Q5_K_XL.gguf").metadata["general.name"] \
        == "Tiny-Distill"

    # Whole this time: the shards go in the same commit, and their folder (udquant's) is no obstacle.
    assert len(list((tmp_path / "out" / "split" / "Tiny-Distill-UD-Q5_K_XL").glob("*/*-of-*.gguf"))) == len(shards)
    proc = job("--imatrix", "none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {name for name in repo.files if name.endswith(".gguf")} == {"Tiny-Distill-UD-Q5_K_XL.gguf"}
    assert len(repo.commits) == 2

    # Another level: the first stays in the repo and in its card.
    proc = job("--imatrix", "none", "--quant", "UD-Q4_K_XL", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {name for name in repo.files if name.endswith(".gguf")} == {
        "Tiny-Distill-UD-Q5_K_XL.gguf", "Tiny-Distill-UD-Q4_K_XL.gguf"}
    result = json.loads(repo.files["udquant-result.json"].data)
    assert [lv["level"] for lv in result["levels"]] == ["UD-Q4_K_XL", "UD-Q5_K_XL"]
    card_text = repo.files["README.md"].data.decode()
    assert "| UD-Q5_K_XL | `Tiny-Distill-UD-Q5_K_XL.gguf` |" in card_text
    assert "Kept from an earlier run: UD-Q5_K_XL" in card_text


def test_gated_repo_without_token(hub, llama, tmp_path):
    add_distill(hub, llama, gated=True)
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 9 and "is gated" in proc.stderr


def test_missing_repo(hub, tmp_path):
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 9 and "does not exist on the Hub" in proc.stderr


def test_offline_mode_and_undescribable_weights_are_hub_errors_not_crashes(hub, llama, tmp_path):
    add_distill(hub, llama)
    proc = run_cli(DISTILL, "--no-upload", "--work-dir", tmp_path / "work", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 9, proc.stderr
    assert f"{DISTILL} is on the Hub, and HF_HUB_OFFLINE is set" in proc.stderr
    # Weights under a name the Hub's safetensors metadata API does not know (no model.safetensors).
    files = {("consolidated.safetensors" if p.name == "model.safetensors" else p.name): p
             for p in llama.iterdir() if p.is_file()}
    hub.state.add_repo(DISTILL, files, card_data={})
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 9, proc.stderr
    assert "safetensors weights cannot be described" in proc.stderr and "Traceback" not in proc.stderr


def imatrix_used(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "udquant-result.json").read_text())["imatrix"]


def test_an_imatrix_made_for_another_model_of_the_same_name_is_skipped(hub, llama, imatrices, tmp_path):
    add_distill(hub, llama)
    # It fits (same tensors: the same tiny model), but its card says whose it is.
    hub.state.add_repo("mradermacher/Tiny-Distill-i1-GGUF", {"Tiny-Distill.imatrix.gguf": imatrices["gguf"]},
                       card_data={"base_model": "another-author/Tiny-Distill"})
    hub.state.add_repo("bartowski/Tiny-Distill-GGUF", {"Tiny-Distill.imatrix": imatrices["dat"]},
                       card_data={"base_model": DISTILL})
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 0, proc.stderr
    assert ("mradermacher/Tiny-Distill-i1-GGUF/Tiny-Distill.imatrix.gguf (mradermacher): made for "
            "another-author/Tiny-Distill") in proc.stderr
    assert imatrix_used(tmp_path)["origin"] == "bartowski"


def test_discovery_order_and_formats(hub, llama, imatrices, toolchain, tmp_path):
    add_distill(hub, llama)
    hub.state.add_repo("bartowski/Tiny-Distill-GGUF", {"Tiny-Distill.imatrix": imatrices["dat"]})
    # mradermacher is preferred, but this one belongs to another model: skipped with a note.
    hub.state.add_repo("mradermacher/Tiny-Distill-i1-GGUF", {"Tiny-Distill.imatrix.gguf": imatrices["other"]})
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 0, proc.stderr
    assert "Tiny-Distill.imatrix.gguf (mradermacher): does not fit" in proc.stderr
    used = imatrix_used(tmp_path)
    assert (used["origin"], used["format"]) == ("bartowski", "dat")
    gguf = next((tmp_path / "out").glob("*.gguf"))
    assert read_gguf_header(gguf).metadata["quantize.imatrix.file"] == "imatrix.dat"  # named as what it is
    hub.state.add_repo("mradermacher/Tiny-Distill-i1-GGUF", {"imatrix.dat": imatrices["dat"],
                                                              "Tiny-Distill.imatrix.gguf": imatrices["gguf"]})
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 0, proc.stderr
    used = imatrix_used(tmp_path)
    assert (used["origin"], used["format"], used["file"]) == ("mradermacher", "gguf", "Tiny-Distill.imatrix.gguf")


def test_own_repo_and_derivatives_are_searched(hub, llama, imatrices, toolchain, tmp_path):
    add_distill(hub, llama)
    hub.state.add_repo("quanter/Tiny-Distill-GGUF", {"Tiny-Distill.imatrix.gguf": imatrices["gguf"]},
                       card_data={"base_model": DISTILL, "base_model_relation": "quantized"})
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 0, proc.stderr
    assert imatrix_used(tmp_path)["origin"] == "derivative"


def test_no_imatrix_on_a_cpu_build_lists_the_options(hub, llama, toolchain, tmp_path):
    add_distill(hub, llama)
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 2, proc.stderr
    assert "no imatrix of someone/Tiny-Distill was found" in proc.stderr
    for option in ("--imatrix compute", "--imatrix PATH", "--imatrix none", "--allow-base-imatrix"):
        assert option in proc.stderr


def test_base_model_imatrix_only_when_asked_and_labelled(hub, llama, imatrices, toolchain, tmp_path):
    add_distill(hub, llama)
    hub.state.add_repo("mradermacher/Tiny-Base-i1-GGUF", {"Tiny-Base.imatrix.gguf": imatrices["gguf"]})
    refused = job("--no-upload", cwd=tmp_path, token=None)
    assert refused.returncode == 2
    proc = job("--no-upload", "--allow-base-imatrix", cwd=tmp_path, token=None)
    assert proc.returncode == 0, proc.stderr
    used = imatrix_used(tmp_path)
    assert used["is_base_model_imatrix"] is True and used["for_model"] == "base-org/Tiny-Base"
    assert "the base model's imatrix, not the distill's" in (tmp_path / "out" / "README.md").read_text()


def test_interrupted_download_resumes(hub, models, toolchain, tmp_path):
    # Larger than huggingface_hub's 10 MiB download chunk, so a cut after 12 MiB leaves data to resume from.
    wide = models("tiny-llama-wide", TinySpec(arch="llama", hidden_size=512, intermediate_size=1536, num_layers=8))
    assert (wide / "model.safetensors").stat().st_size > 20 << 20
    add_distill(hub, wide)
    hub.state.interrupt_once[f"{DISTILL}/model.safetensors"] = 12 << 20
    first = job("--no-upload", "--imatrix", "none", cwd=tmp_path, token=None)
    if first.returncode != 0:  # the client gave up: the same command again resumes
        second = job("--no-upload", "--imatrix", "none", cwd=tmp_path, token=None)
        assert second.returncode == 0, second.stderr
    ranges = [{k.lower(): v for k, v in h.items()}.get("range", "") for m, p, h in hub.state.requests
              if m == "GET" and p.endswith(f"{DISTILL}/resolve/{hub.state.repos[DISTILL].sha}/model.safetensors")]
    assert any(r.startswith("bytes=") and not r.startswith("bytes=0-") for r in ranges), ranges
    assert (tmp_path / "out" / "udquant-result.json").is_file()
