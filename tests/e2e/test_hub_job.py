"""The job against the local Hub test server through the real huggingface_hub client:
resolve, imatrix discovery, download, upload in one commit, and the token kept secret."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.e2e.conftest import run_cli
from udquant.gguf_header import read_gguf_header
from udquant.tiny_model import TinySpec

pytestmark = pytest.mark.e2e
TOKEN = "hf_test_token_owner"
DISTILL = "someone/Tiny-Distill"


@pytest.fixture(scope="module")
def imatrices(llama, odd_llama, toolchain, tmp_path_factory) -> dict[str, Path]:
    """Real imatrix files of the tiny llama (GGUF and legacy .dat) and of another model."""
    root = tmp_path_factory.mktemp("imatrices")
    made = {}
    for name, model, fmt in (("gguf", llama, "gguf"), ("dat", llama, "dat"), ("other", odd_llama, "gguf")):
        bf16 = root / f"{name}-bf16.gguf"
        subprocess.run([str(Path(toolchain.converter).parent.parent.parent.parent / "x") if False else
                        __import__("sys").executable, toolchain.converter, model, "--outtype", "bf16",
                        "--outfile", bf16], check=True, capture_output=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(toolchain.converter.parent / "gguf-py")})
        out = root / f"{name}.imatrix.{fmt}"
        subprocess.run([toolchain.tool("llama-imatrix"), "-m", bf16, "-f", "calibration.txt", "-o", out.name,
                        "--output-format", fmt, "-c", "128", "--chunks", "4", "--no-ppl"], check=True,
                       capture_output=True, cwd=root, input=None) if (root / "calibration.txt").exists() else None
        if not out.exists():
            from udquant.library import data_file

            (root / "calibration.txt").write_text(data_file("calibration.txt").read_text())
            subprocess.run([toolchain.tool("llama-imatrix"), "-m", bf16, "-f", "calibration.txt", "-o", out.name,
                            "--output-format", fmt, "-c", "128", "--chunks", "4", "--no-ppl"], check=True,
                           capture_output=True, cwd=root)
        made[name] = out
    return made


def add_distill(hub, model_dir: Path, *, gated: bool = False) -> None:
    files = {p.name: p for p in model_dir.iterdir() if p.is_file()}
    hub.state.add_repo(DISTILL, files, gated=gated, card_data={"base_model": "base-org/Tiny-Base"})
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


def test_gated_repo_without_token(hub, llama, tmp_path):
    add_distill(hub, llama, gated=True)
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 9 and "is gated" in proc.stderr


def test_missing_repo(hub, tmp_path):
    proc = job("--no-upload", cwd=tmp_path, token=None)
    assert proc.returncode == 9 and "does not exist on the Hub" in proc.stderr


def imatrix_used(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "udquant-result.json").read_text())["imatrix"]


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
