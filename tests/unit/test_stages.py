"""Command lines are pure functions; the runner, work dirs and disk checks on real files."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.fake_job import fake_toolchain, tiny_llama_folder
from tests.layouts import header_of, llama_layout
from udquant import toolchain as toolchain_module
from udquant.cli import add_job_arguments, options_from_args
from udquant.convert import build_convert_args, build_mmproj_check_args, check_mmproj_pair, projector_margin_mib
from udquant.errors import DiskSpaceError, InputError, ToolchainError, ToolError
from udquant.fetch import check_disk_space
from udquant.imatrix import ImatrixSettings, build_imatrix_args
from udquant.job import JobOptions, run_job
from udquant.quantize import build_quantize_args
from udquant.recipe import find_recipe, plan_quantization
from udquant.runner import run_tool
from udquant.toolchain import TOOLS, Toolchain, find_toolchain, load_toolchain, warn_if_gpu_unused
from udquant.workdir import atomic_output, check_work_dir, open_stage, remove_stale_partials

TOOLCHAIN = Toolchain(Path("/tc"), "b11434", "abc", "cpu", "pypi", "d" * 64)


def test_convert_args():
    args = build_convert_args(TOOLCHAIN, Path("/m"), Path("/o.gguf"), no_mtp=True, model_name="m")
    assert args[1:] == ["/tc/src/convert_hf_to_gguf.py", "/m", "--outtype", "bf16", "--outfile", "/o.gguf",
                        "--model-name", "m", "--no-mtp"]
    kept = build_convert_args(TOOLCHAIN, Path("/m"), Path("/o.gguf"), no_mtp=False, model_name="m")
    assert "--no-mtp" not in kept and "--model-name" in kept


def test_imatrix_args_leave_offload_to_llama_cpp():
    settings = ImatrixSettings(Path("c.txt"), chunks=8, context=128)
    args = build_imatrix_args(TOOLCHAIN, Path("m.gguf"), Path("c.txt"), settings, Path("o.gguf"))
    assert args == ["/tc/bin/llama-imatrix", "-m", "m.gguf", "-f", "c.txt", "-o", "o.gguf", "--output-format",
                    "gguf", "-c", "128", "--no-ppl", "--chunks", "8"]
    gpu = Toolchain(Path("/tc"), "b11434", "abc", "cuda", "git", "d" * 64)
    assert build_imatrix_args(gpu, Path("m.gguf"), Path("c.txt"), settings, Path("o.gguf")) == args


def test_imatrix_args_whole_text_mtp_layers_and_threads():
    whole = ImatrixSettings(Path("c.txt"), context=256)
    assert "--chunks" not in build_imatrix_args(TOOLCHAIN, Path("m"), Path("c"), whole, Path("o"))
    # MTP layers are in llama-imatrix's graph only with --nextn, which needs one sequence per batch.
    args = build_imatrix_args(TOOLCHAIN, Path("m"), Path("c"), whole, Path("o"), nextn_layers=1, threads=3)
    assert args[-5:] == ["--nextn", "-b", "256", "-t", "3"]
    several = build_imatrix_args(TOOLCHAIN, Path("m"), Path("c"), whole, Path("o"), nextn_layers=3)
    assert "--nextn" not in several  # llama-imatrix b11434 stops on more than one NextN layer


def test_mmproj_check_args_leave_offload_to_llama_cpp():
    args = build_mmproj_check_args(TOOLCHAIN, Path("q.gguf"), Path("mmproj.gguf"), Path("i.png"), threads=2,
                                   fit_margin_mib=3000)
    assert args[:7] == ["/tc/bin/llama-mtmd-cli", "-m", "q.gguf", "--mmproj", "mmproj.gguf", "--image", "i.png"]
    assert args[-4:] == ["-fitt", "3000", "-t", "2"] and "-ngl" not in args
    gpu = Toolchain(Path("/tc"), "b11434", "abc", "cuda", "git", "d" * 64)
    assert build_mmproj_check_args(gpu, Path("q.gguf"), Path("mmproj.gguf"), Path("i.png"), threads=2,
                                   fit_margin_mib=3000) == args


# Fails like llama-mtmd-cli on a projector of another width; its reason reaches the log only from the
# given attempt on, as when the pinned build's logger loses its last lines at exit.
LOSSY_MTMD = """#!/bin/sh
count=$(cat "$0.count" 2>/dev/null || echo 0); count=$((count + 1)); echo $count > "$0.count"
echo "0.00.119.585 W load_hparams: Qwen-VL models require at minimum 1024 image tokens"
if [ $count -ge {shows_from} ]; then
  echo "0.00.268.626 E mtmd_init_from_file: error: mismatch between text model (n_embd = 320) and mmproj (n_embd = 256)"
fi
exit 1
"""


@pytest.mark.parametrize(("shows_from", "runs", "hint"), [
    (2, 2, "the vision projector's output width is not the text model's embedding width"),
    (9, 3, None),  # never shown: three runs, then the failure as it is
])
def test_a_failed_mmproj_check_whose_reason_was_lost_runs_again(tmp_path, caplog, shows_from, runs, hint):
    tool = tmp_path / "bin" / "llama-mtmd-cli"
    tool.parent.mkdir()
    tool.write_text(LOSSY_MTMD.format(shows_from=shows_from))
    tool.chmod(0o755)
    mmproj = tmp_path / "mmproj.gguf"
    mmproj.write_bytes(b"\0" * 1024)
    with pytest.raises(ToolError) as caught:
        check_mmproj_pair(Toolchain(tmp_path, "b11434", "abc", "cpu", "pypi", "d" * 64), tmp_path / "q.gguf",
                          mmproj, image=tmp_path / "i.png", log_path=tmp_path / "check.log")
    assert caught.value.hint == hint and caught.value.returncode == 1
    assert (tmp_path / "bin" / "llama-mtmd-cli.count").read_text().strip() == str(runs)
    assert caplog.text.count("its reason was lost at exit") == runs - 1


def test_the_projector_gets_room_beside_the_fitted_text_model(tmp_path):
    mmproj = tmp_path / "mmproj.gguf"
    mmproj.write_bytes(b"\0" * (900 * 2**20 // 1000))  # 0.9 MiB
    assert projector_margin_mib(mmproj) == 1024 + 2


def test_quantize_args():
    plan = plan_quantization(find_recipe("UD-Q5_K_XL", "llama"), header_of(llama_layout()))
    args = build_quantize_args(TOOLCHAIN, Path("in.gguf"), Path("out.gguf"), plan,
                               tensor_types=Path("tt.txt"), imatrix=Path("im.gguf"), threads=4)
    assert args == ["/tc/bin/llama-quantize", "--tensor-type-file", "tt.txt", "--imatrix", "im.gguf",
                    "in.gguf", "out.gguf", "Q5_K_M", "4"]


def test_tool_failure_carries_the_tail(tmp_path):
    script = "import sys\nfor i in range(40): print('line', i)\nsys.exit(3)"
    with pytest.raises(ToolError) as err:
        run_tool([sys.executable, "-c", script], stage="convert", log_path=tmp_path / "x.log",
                 hint_for={"line 39": "a hint"})
    text = str(err.value)
    assert "exited with code 3" in text and "line 39" in text and "line 5\n" not in text
    assert "hint: a hint" in text
    assert "line 0" in (tmp_path / "x.log").read_text()


def test_a_tool_killed_by_a_signal_is_named_and_sigkill_hints_at_memory(tmp_path):
    # What the kernel's OOM killer does: SIGKILL, with nothing in the tool's own output.
    script = "import os, signal\nprint('Loading model', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(ToolError) as err:
        run_tool([sys.executable, "-c", script], stage="convert", log_path=tmp_path / "x.log",
                 hint_for={"Loading": "an output hint"})
    assert err.value.returncode == -signal.SIGKILL
    assert "was killed by SIGKILL" in err.value.message and "code -9" not in err.value.message
    assert "out-of-memory killer" in str(err.value.hint)
    script = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"
    with pytest.raises(ToolError) as err:
        run_tool([sys.executable, "-c", "import faulthandler; faulthandler.disable()\n" + script], stage="quantize",
                 log_path=tmp_path / "y.log")
    assert "was killed by SIGSEGV" in err.value.message and err.value.hint is None


# A stand-in for the converter: it writes its output (the job's partial file) for ever.
SLOW_CONVERTER = """import os, sys, time
output = open(sys.argv[sys.argv.index("--outfile") + 1], "wb")
pid_file = os.environ["FAKE_CONVERTER_PID_FILE"]
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)
while True:
    output.write(b"x" * 4096)
    output.flush()
    time.sleep(0.05)
"""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_stops_the_running_tool_and_removes_its_partial(tmp_path):
    """docker stop / a cancelled HF Job send SIGTERM to udquant-job alone (Ctrl-C reaches the whole
    process group): the tool it runs must not live on as an orphan writing its partial file."""
    pid_file = tmp_path / "converter.pid"
    env = {**os.environ, "UDQUANT_LLAMA_CPP": str(fake_toolchain(tmp_path / "toolchain", SLOW_CONVERTER)),
           "FAKE_CONVERTER_PID_FILE": str(pid_file)}
    work = tmp_path / "work"
    job = subprocess.Popen([str(Path(sys.executable).parent / "udquant-job"), str(tiny_llama_folder(tmp_path / "m")),
                            "--work-dir", str(work), "--out-dir", str(tmp_path / "out"), "--imatrix", "none",
                            "--no-upload", "--disk-reserve-gb", "0"],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    converter = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.exists(), job.communicate(timeout=30)
        converter = int(pid_file.read_text())
        assert list(work.glob("convert-*/model-bf16.partial-*.gguf"))
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=30)
        assert job.returncode == 143, stderr
        assert "terminated (SIGTERM)" in stderr
        assert not _running(converter)
        assert not list(work.glob("convert-*/*.partial-*"))
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        if converter is not None and _running(converter):
            os.kill(converter, signal.SIGKILL)


HANGING_CLEANUP = """
import time
from udquant.cli import Terminated, _sigterm_as_interrupt
with _sigterm_as_interrupt():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except Terminated:
        print("cleaning up", flush=True)
        time.sleep(60)  # a cleanup that hangs
"""


def test_a_second_sigterm_ends_the_job_at_once_even_as_pid_1():
    """In the image the job is PID 1, for which the kernel ignores a signal left to its default action."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("no PID namespace can be made here (unshare)")
    launcher = subprocess.Popen([unshare, "--pid", "--fork", sys.executable, "-c", HANGING_CLEANUP],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None and launcher.stdout.readline() == "ready\n"
        (job,) = psutil.Process(launcher.pid).children()  # PID 1 inside its namespace
        job.send_signal(signal.SIGTERM)
        assert launcher.stdout.readline() == "cleaning up\n"
        job.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=10) == 143  # unshare --fork exits with its child's status
    finally:
        launcher.kill()
        launcher.wait()


class RecordedProgress:
    def __init__(self):
        self.steps, self.lines = [], []

    def step(self, done, total):
        self.steps.append((done, total))

    def line(self, text):
        self.lines.append(text)


def test_tool_output_is_followed_from_its_log_file(tmp_path):
    """The tool writes the log itself; progress and the tail come from following the file, each of
    tqdm's carriage-return redraws is a step, and a last line without newline is kept."""
    script = ("import sys, time\n"
              "for i in range(1, 4):\n"
              "    print(f'[ {i}/ 3] blk.{i}.attn_k.weight', flush=True); time.sleep(0.15)\n"
              "sys.stdout.write('Writing: 10%|\\rWriting: 100%|\\n'); sys.stdout.flush()\n"
              "sys.stderr.write('done without newline')\n")
    progress = RecordedProgress()
    log = tmp_path / "tool.log"
    run_tool([sys.executable, "-c", script], stage="quantize", log_path=log, progress=progress)  # type: ignore[arg-type]
    assert progress.steps == [(1, 3), (2, 3), (3, 3), (10, 100), (100, 100)]
    assert progress.lines[-1] == "Writing: 100%|"
    text = log.read_text()
    assert text.startswith(f"$ {sys.executable} -c ") and text.endswith("done without newline")
    with pytest.raises(ToolError) as err:
        run_tool([sys.executable, "-c", script + "sys.exit(1)\n"], stage="quantize", log_path=log)
    assert str(err.value).rstrip().endswith("done without newline")


def test_stage_dirs_are_keyed_and_reused(tmp_path):
    first = open_stage(tmp_path, "convert", {"a": 1})
    assert open_stage(tmp_path, "convert", {"a": 2}).path != first.path
    assert first.done_output() is None
    output = first.path / "out.gguf"
    output.write_bytes(b"x" * 10)
    first.mark_done(output, 1.0)
    assert open_stage(tmp_path, "convert", {"a": 1}).done_output() == output
    output.write_bytes(b"x" * 5)  # changed after it was recorded: not done
    assert first.done_output() is None


def test_stale_partials_of_dead_writers_are_removed(tmp_path):
    stage = open_stage(tmp_path, "quantize", {"a": 1})
    dead = stage.path / "model.partial-999999999.gguf"
    alive = stage.path / f"model.partial-{os.getppid()}.gguf"
    dead_folder = stage.path / "model.partial-999999998"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    (dead_folder / "sub").mkdir(parents=True)
    open_stage(tmp_path, "quantize", {"a": 1})
    assert not dead.exists() and not dead_folder.exists() and alive.exists()


def test_atomic_output_appears_only_when_complete(tmp_path):
    output = tmp_path / "model.gguf"
    output.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_output(output) as partial:
        partial.write_bytes(b"half")
        raise KeyboardInterrupt
    assert output.read_bytes() == b"old" and list(tmp_path.iterdir()) == [output]
    with atomic_output(output) as partial:
        assert partial.parent == tmp_path and partial.suffix == ".gguf" and f"{os.getpid()}" in partial.name
        partial.write_bytes(b"new")
        assert output.read_bytes() == b"old"
    assert output.read_bytes() == b"new" and list(tmp_path.iterdir()) == [output]


def test_partial_names_are_recognised_as_stale(tmp_path):
    """A killed writer's partial has the name remove_stale_partials parses (pid after '.partial-')."""
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "card.md") as partial:
        partial.write_text("x")
        kept = partial.with_name(partial.name.replace(str(os.getpid()), "999999999"))
        partial.rename(kept)
        raise RuntimeError
    assert kept.exists()
    remove_stale_partials(tmp_path)
    assert not kept.exists()


def test_a_work_dir_where_a_file_is_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    for work in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(InputError, match=f"--work-dir {work}: {tmp_path / 'afile'} is a file, not a folder"):
            run_job(JobOptions(source=str(tmp_path / "no-model"), work_dir=work))
    check_work_dir(tmp_path / "not" / "yet")  # folders still to be made are fine


def _job_options(*argv: str) -> JobOptions:
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    return options_from_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize(("argv", "message"), [
    (["--split-size-gb", "nan"], "--split-size-gb: 'nan' is not a size in GB (a finite number > 0 and <= 50)"),
    (["--split-size-gb", "0"], "--split-size-gb: '0' is not a size in GB (a finite number > 0 and <= 50)"),
    (["--split-size-gb", "60"], "--split-size-gb: '60' is not a size in GB (a finite number > 0 and <= 50)"),
    (["--split-size-gb", "1e300"], "--split-size-gb: '1e300' is not a size in GB"),
    (["--disk-reserve-gb", "nan"], "--disk-reserve-gb: 'nan' is not a size in GB (a finite number >= 0)"),
    (["--disk-reserve-gb", "-1"], "--disk-reserve-gb: '-1' is not a size in GB"),
    (["--disk-reserve-gb", "lots"], "--disk-reserve-gb: 'lots' is not a size in GB"),
])
def test_sizes_must_be_finite_and_not_negative(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        _job_options("./m", *argv)
    assert done.value.code == 2 and message in capsys.readouterr().err
    assert _job_options("./m", "--disk-reserve-gb", "0", "--split-size-gb", "0.5").disk_reserve == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--calibration", "TMP/nope.txt"], "--calibration TMP/nope.txt: no such file"),
    (["--calibration", "TMP/empty.txt"], "--calibration TMP/empty.txt: the file is empty"),
    (["--imatrix", "none", "--calibration", "TMP/text.txt"],
     "--calibration only applies when the imatrix is computed, not with --imatrix none"),
    (["--imatrix", "TMP/text.txt", "--imatrix-chunks", "4", "--imatrix-context", "128"],
     "--imatrix-chunks, --imatrix-context only apply when the imatrix is computed"),
    (["--quant", "UD-Q4_K_XL", "--quant", "UD-Q5_K_XL", "--quant", "UD-Q4_K_XL"],
     "--quant UD-Q4_K_XL is given more than once"),
    (["--quant", "../llama/UD-Q4_K_XL"], "--quant '../llama/UD-Q4_K_XL' is not a level name"),
    (["--output-repo", "bad repo!!"], "--output-repo 'bad repo!!' is not a Hugging Face repo id"),
    (["--private"], "--private only applies with --upload"),
    (["--private", "--no-upload"], "--private only applies with --upload"),
    (["--revision", "main"], "--revision applies to a Hub repo, not to the local folder ./m"),
    # Given, even with the default's value: told apart from not given.
    (["--imatrix", "none", "--imatrix-context", "512"], "--imatrix-context only applies when the imatrix is"),
    (["--eval-chunks", "16"], "--eval-chunks only applies with --eval"),
])
def test_job_options_that_cannot_apply_are_refused(tmp_path, monkeypatch, argv, message):
    monkeypatch.setenv("HF_TOKEN", "hf_token")
    (tmp_path / "empty.txt").touch()
    (tmp_path / "text.txt").write_text("text")
    with pytest.raises(InputError, match=re.escape(message.replace("TMP", str(tmp_path)))):
        _job_options("./m", *[arg.replace("TMP", str(tmp_path)) for arg in argv])


def test_job_options_as_given(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "text.txt").write_text("text")
    options = _job_options("./m", "--calibration", str(tmp_path / "text.txt"), "--imatrix-chunks", "4")
    assert options.levels is None and options.calibration == tmp_path / "text.txt"  # auto computes for a folder
    assert _job_options("./m", "--quant", "UD-Q4_K_XL", "--quant", "UD-Q5_K_XL").levels == ("UD-Q4_K_XL",
                                                                                          "UD-Q5_K_XL")
    assert _job_options("./m", "--private", "--upload").private
    with pytest.raises(InputError, match="--private only applies with --upload") as err:
        _job_options("owner/Distill", "--private")
    assert "set HF_TOKEN" in str(err.value.hint)
    monkeypatch.setenv("HF_TOKEN", "hf_token")  # a Hub repo with a token uploads by default
    assert _job_options("owner/Distill", "--private", "--revision", "main").private


def test_output_files_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    runs = [(["eval", "a.gguf", "b.gguf", "--json", "afile/x.json"], "--json afile/x.json: afile is a file"),
            (["eval", "a.gguf", "b.gguf", "--plot", "afile/x.png"], "--plot afile/x.png: afile is a file"),
            (["recipe", "extract", "x.gguf", "-o", "afile/x.yaml"], "--output afile/x.yaml: afile is a file"),
            (["recipe", "extract", "x.gguf", "-o", "."], "--output . is a folder, not a file")]
    env = {**os.environ, "UDQUANT_LLAMA_CPP": str(tmp_path / "no-toolchain")}
    for argv, message in runs:
        done = subprocess.run([str(Path(sys.executable).parent / "udquant"), *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_an_output_file_replaces_only_a_file_of_its_own_kind(tmp_path):
    """A mistyped command (`--plot q4.gguf` where q4.gguf was meant as a quant) must not overwrite the GGUF."""
    gguf = tmp_path / "q4.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    env = {**os.environ, "UDQUANT_LLAMA_CPP": str(tmp_path / "no-toolchain")}
    runs = [(["eval", "a.gguf", "b.gguf", "--plot", "q4.gguf"], "--plot q4.gguf exists and is not a plot udquant"),
            (["eval", "a.gguf", "b.gguf", "--json", "config.json"], "--json config.json exists and is not udquant"),
            (["recipe", "extract", "x.gguf", "-o", "q4.gguf"], "--output q4.gguf exists and is not a recipe udquant")]
    for argv, message in runs:
        done = subprocess.run([str(Path(sys.executable).parent / "udquant"), *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert gguf.read_bytes().startswith(b"GGUF") and "architectures" in (tmp_path / "config.json").read_text()


def test_what_an_output_file_may_replace_and_where_it_is_written(tmp_path):
    from udquant.evaluate import EvalResult, QuantEval
    from udquant.out_dir import check_output_file, is_eval_json, is_extracted_recipe, is_udquant_plot
    from udquant.plot import plot_kld_vs_bpw

    # What udquant itself wrote there before is replaced, as a rerun expects; a user's file of the same format is not.
    result = EvalResult(mean_kld=0.01, mean_kld_stderr=0.001, kld_p99=0.1, median_kld=0.01, max_kld=0.2,
                        same_top_p=0.99, ppl=10.0, ppl_base=9.9, ppl_ratio=1.01, chunks=4, context=256)
    plot = plot_kld_vs_bpw([QuantEval("q", 1000, 4.5, result)], tmp_path / "old.png")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "earlier.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(25) + b"tEXtSoftware\x00Matplotlib version3.9")
    (tmp_path / "empty.json").touch()  # as mktemp makes it
    (tmp_path / "old.json").write_text('{"base": "x.gguf", "eval_text": "t", "eval": []}')
    (tmp_path / "extracted.yaml").write_text("id: a/B\nprovenance: {kind: template, source: u/T}\nrules: []\n")
    (tmp_path / "mine.yaml").write_text("id: a/B\nprovenance: {kind: derived}\nrules: []\n")
    for name, is_kind, replaced in [(plot.name, is_udquant_plot, True), ("photo.png", is_udquant_plot, False),
                                    ("old.json", is_eval_json, True), ("extracted.yaml", is_extracted_recipe, True),
                                    ("mine.yaml", is_extracted_recipe, False), ("new.png", is_udquant_plot, True),
                                    ("earlier.png", is_udquant_plot, True), ("empty.json", is_eval_json, True)]:
        if replaced:
            assert check_output_file(tmp_path / name, "--x", "kind", is_kind) == tmp_path / name
        else:
            with pytest.raises(InputError, match=f"--x {tmp_path / name} exists and is not kind: it is not replaced"):
                check_output_file(tmp_path / name, "--x", "kind", is_kind)
    # A link is written through; a pipe, an unwritable folder and an overlong name are refused before any work.
    (tmp_path / "link.json").symlink_to(tmp_path / "old.json")
    assert check_output_file(tmp_path / "link.json", "--json", "kind", is_eval_json) == tmp_path / "old.json"
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InputError, match="pipe is not a regular file"):
        check_output_file(tmp_path / "pipe", "--json", "kind", is_eval_json)
    with pytest.raises(InputError, match="longer than 255 bytes"):
        check_output_file(tmp_path / ("x" * 300 + ".json"), "--json", "kind", is_eval_json)
    with pytest.raises(InputError, match="--json /proc/1/none/x.json: the folder /proc/1/none cannot be created"):
        check_output_file(Path("/proc/1/none/x.json"), "--json", "kind", is_eval_json)
    assert not (tmp_path / "none").exists()


def test_disk_space(tmp_path):
    check_disk_space(tmp_path / "not" / "yet", 1)
    with pytest.raises(DiskSpaceError, match=r"needs about .* GB are free"):
        check_disk_space(tmp_path, 10**18)


def test_toolchain_checks(tmp_path):
    with pytest.raises(ToolchainError, match="no toolchain.json"):
        load_toolchain(tmp_path)
    (tmp_path / "toolchain.json").write_text('{"tag": "b1"}')
    with pytest.raises(ToolchainError, match="pinned to b11434"):
        load_toolchain(tmp_path)
    (tmp_path / "toolchain.json").write_text('{"tag": "b11434"}')
    with pytest.raises(ToolchainError, match="incomplete: missing llama-quantize"):
        load_toolchain(tmp_path)


def test_a_cuda_build_that_ran_on_the_cpu_is_reported(tmp_path, caplog):
    log = tmp_path / "imatrix.log"
    log.write_text("0.00.001.686 E ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected\n"
                   "0.00.021.375 I system_info: n_threads = 2 | CUDA : ARCHS = 900 |\n")
    cuda = Toolchain(Path("/tc"), "b11434", "abc", "cuda", "git:b11434", "d" * 64)
    assert warn_if_gpu_unused(cuda, log, "llama-imatrix")
    assert "llama-imatrix ran on the CPU" in caplog.text and "no CUDA-capable device is detected" in caplog.text
    assert "--gpus all" in caplog.text
    assert not warn_if_gpu_unused(TOOLCHAIN, log, "llama-imatrix")  # a CPU build is meant to
    log.write_text("load_tensors: offloaded 5/5 layers to GPU\n")
    assert not warn_if_gpu_unused(cuda, log, "llama-imatrix")


def _cached_build(cache: Path, name: str, backend: str) -> Path:
    root = cache / "llama.cpp" / name
    (root / "bin").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "src" / "convert_hf_to_gguf.py").touch()
    for tool in TOOLS:
        (root / "bin" / tool).touch(mode=0o755)
    (root / "toolchain.json").write_text(json.dumps({"tag": "b11434", "backend": backend}))
    return root


def test_cached_cuda_build_is_preferred_only_with_a_driver(tmp_path, monkeypatch):
    monkeypatch.delenv("UDQUANT_LLAMA_CPP", raising=False)
    monkeypatch.setenv("UDQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(toolchain_module, "_cache_roots", lambda: [tmp_path])
    cpu = _cached_build(tmp_path, "b11434-cpu-aaaa", "cpu")
    # The manifest says what a build is, whatever its folder is called.
    cuda = _cached_build(tmp_path, "b11434-custom", "cuda")
    monkeypatch.setattr(toolchain_module, "nvidia_driver_present", lambda: True)
    assert find_toolchain().root == cuda
    monkeypatch.setattr(toolchain_module, "nvidia_driver_present", lambda: False)
    assert find_toolchain().root == cpu
    shutil.rmtree(cpu)
    with pytest.raises(ToolchainError, match="only CUDA builds .* no NVIDIA driver here"):
        find_toolchain()
    monkeypatch.setenv("UDQUANT_LLAMA_CPP", str(cuda))  # the image's choice: refused before any work
    with pytest.raises(ToolchainError, match="is a CUDA build of llama.cpp and the NVIDIA driver is not here") as err:
        find_toolchain()
    assert "--gpus all" in str(err.value.hint)
    monkeypatch.setattr(toolchain_module, "nvidia_driver_present", lambda: True)
    assert find_toolchain().root == cuda


def test_a_build_that_failed_its_check_is_never_used(tmp_path, monkeypatch):
    monkeypatch.delenv("UDQUANT_LLAMA_CPP", raising=False)
    monkeypatch.setattr(toolchain_module, "_cache_roots", lambda: [tmp_path])
    monkeypatch.setattr(toolchain_module, "nvidia_driver_present", lambda: True)
    good = _cached_build(tmp_path, "b11434-cpu-aaaa", "cpu")
    _cached_build(tmp_path, "b11434-cuda-bbbb.partial", "cuda")  # newer, and a GPU build: still not it
    assert find_toolchain().root == good
    shutil.rmtree(good)
    with pytest.raises(ToolchainError, match="no llama.cpp b11434 build found"):
        find_toolchain()


def test_an_error_that_echoes_a_token_is_shown_without_it(monkeypatch, caplog, tmp_path):
    """A service's answer may quote what it was sent; the one line the user sees never holds a token."""
    from huggingface_hub import constants

    from udquant.cli import _run
    from udquant.errors import HubError

    monkeypatch.setenv("HF_TOKEN", "hf_s3cr3t.+*?[]")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_another")
    stored = tmp_path / "token"
    stored.write_text("hf_stored\n")  # `hf auth login`
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    monkeypatch.setenv("HF_OIDC_RESOURCE", "models/x/y")  # get_token() would ask the network here, and fail

    def echo(args: argparse.Namespace) -> int:
        raise HubError("the Hub answered: bad token hf_s3cr3t.+*?[] for ghp_another, not hf_stored", hint="retry")

    assert _run("job", echo, argparse.Namespace()) == HubError.exit_code
    assert "bad token *** for ***, not ***" in caplog.text
    assert not any(secret in caplog.text for secret in ("s3cr3t", "ghp_another", "hf_stored"))


def test_an_internal_error_is_reported_with_its_traceback_and_without_a_token(monkeypatch, caplog):
    from udquant.cli import EXIT_INTERNAL, _run

    monkeypatch.setenv("HF_TOKEN", "hf_s3cr3t")
    monkeypatch.delenv("UDQUANT_DEBUG", raising=False)

    def broken(args: argparse.Namespace) -> int:
        raise KeyError("Authorization: Bearer hf_s3cr3t")

    assert _run("job", broken, argparse.Namespace()) == EXIT_INTERNAL
    assert "internal error: a bug in udquant" in caplog.text
    assert "in broken" in caplog.text and "KeyError: 'Authorization: Bearer ***'" in caplog.text
    assert "s3cr3t" not in caplog.text
