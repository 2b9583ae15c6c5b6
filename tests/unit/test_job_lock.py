"""Jobs for one model that share a work dir take turns: two containers on one volume see each other's
files but not each other's pids, so only a lock keeps them out of each other's stages and output."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fake_job import fake_toolchain, tiny_llama_folder
from udquant.workdir import LOCKS, LOGS, hold_model_lock, model_lock_path, model_log_path

# Another job holding the lock: it holds it until its stdin is closed.
HOLDER = """import sys
from pathlib import Path
from udquant.workdir import hold_model_lock
with hold_model_lock(Path(sys.argv[1]), sys.argv[2], sys.argv[3]):
    print("held", flush=True)
    sys.stdin.read()
"""
QUICK = 0.3  # long enough for a lock that is free to be taken, so not taking it means waiting
SLOW = 10  # how long something that must happen may take on a loaded machine


@contextmanager
def held_by_another_job(work: Path, name: str, shown_as: str, *,
                        launcher: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen([*launcher, sys.executable, "-c", HOLDER, str(work), name, shown_as],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield holder
    finally:
        release(holder)


def release(holder: subprocess.Popen[str]) -> None:
    if holder.stdin is not None and not holder.stdin.closed:
        holder.stdin.close()
    try:
        holder.wait(timeout=SLOW)
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait()


def take_in_thread(work: Path, name: str, shown_as: str) -> tuple[threading.Event, list[bool]]:
    """Take the lock in a thread, as a second job would: set once it is held, with whether it waited."""
    held, waited = threading.Event(), []

    def take() -> None:
        with hold_model_lock(work, name, shown_as) as did_wait:
            waited.append(did_wait)
            held.set()

    threading.Thread(target=take, daemon=True).start()
    return held, waited


def waiting_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "waiting for it to finish" in r.getMessage()]


@pytest.mark.parametrize(("holding", "why"), [
    ("owner/Distill-8B", ""),
    ("alice/Distill-8B", " (owner/Distill-8B has the same name: such jobs take turns)"),  # same default out dir
])
def test_a_second_job_for_a_model_waits_for_the_first(tmp_path, caplog, holding, why):
    caplog.set_level(logging.INFO)
    work = tmp_path / "work"
    with held_by_another_job(work, "Distill-8B", holding) as holder:
        held, waited = take_in_thread(work, "Distill-8B", "owner/Distill-8B")
        assert not held.wait(QUICK)
        assert waiting_lines(caplog) == [
            f"another udquant job (pid {holder.pid} on host {socket.gethostname()}) is working on {holding} "
            f"in {work}; waiting for it to finish{why}"]
        release(holder)
        assert held.wait(SLOW)
    assert waited == [True]
    assert len(waiting_lines(caplog)) == 1
    record = json.loads(model_lock_path(work, "Distill-8B").read_text())
    assert record == {"model": "owner/Distill-8B", "pid": os.getpid(), "host": socket.gethostname()}


def test_jobs_for_different_models_do_not_wait_for_each_other(tmp_path, caplog):
    work = tmp_path / "work"
    with held_by_another_job(work, "Distill-8B", "owner/Distill-8B"):
        held, waited = take_in_thread(work, "Distill-14B", "owner/Distill-14B")
        assert held.wait(SLOW)
    assert waited == [False] and not waiting_lines(caplog)


def test_jobs_in_separate_pid_namespaces_take_turns(tmp_path, caplog):
    """As in two containers: the holder is pid 1 in its own namespace, which this process cannot see."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("no PID namespace can be made here (unshare)")
    work = tmp_path / "work"
    with held_by_another_job(work, "Distill-8B", "owner/Distill-8B", launcher=(unshare, "--pid", "--fork")) as holder:
        held, waited = take_in_thread(work, "Distill-8B", "owner/Distill-8B")
        assert not held.wait(QUICK)
        assert "(pid 1 on host" in waiting_lines(caplog)[0]
        release(holder)
        assert held.wait(SLOW)
    assert waited == [True]


def test_lock_and_log_files_have_safe_names(tmp_path):
    assert model_lock_path(tmp_path, "Distill-8B_v1.5") == tmp_path / LOCKS / "Distill-8B_v1.5.lock"
    assert model_lock_path(tmp_path, "my model: ä/b") == tmp_path / LOCKS / "my_model____b.lock"
    assert len(model_lock_path(tmp_path, "x" * 300).name) < 255
    # Jobs for other models run at once: each writes its own log of a step that is not cached.
    assert model_log_path(tmp_path, "A-8B", "publish") == tmp_path / LOGS / "A-8B-publish.log"
    assert model_log_path(tmp_path, "B-8B", "publish") != model_log_path(tmp_path, "A-8B", "publish")
    assert len(model_log_path(tmp_path, "x" * 300, "mmproj-check").name) < 255
    with hold_model_lock(tmp_path / "work", "..", "../.."):
        assert [p.name for p in (tmp_path / "work" / LOCKS).iterdir()] == ["...lock"]


def test_where_the_file_system_cannot_lock_the_job_runs_with_a_warning(tmp_path, caplog, monkeypatch):
    def refuse(fd: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)  # NFS without its lock daemon answers so
    with hold_model_lock(tmp_path / "work", "Distill-8B", "owner/Distill-8B") as waited:
        assert waited is False
    assert "Distill-8B.lock cannot be locked (No locks available): running unlocked" in caplog.text


# The job run as the CLI runs it: a local model, and a converter that fails at once (or would, were it reached).
FAILING_CONVERTER = "import sys\nsys.exit('fake converter: converts nothing')\n"


@contextmanager
def job_waiting_for_the_lock(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, subprocess.Popen[str]]]:
    """A udquant-job for the model another job holds the lock of, once it said that it waits."""
    work, model = tmp_path / "work", tiny_llama_folder(tmp_path / "Distill-8B")
    env = {**os.environ, "UDQUANT_LLAMA_CPP": str(fake_toolchain(tmp_path / "toolchain", FAILING_CONVERTER))}
    argv = [str(Path(sys.executable).parent / "udquant-job"), str(model), "--work-dir", str(work),
            "--imatrix", "none", "--no-upload", "--disk-reserve-gb", "0"]
    with (held_by_another_job(work, model.name, model.name) as holder,
          subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True) as job):
        try:
            assert job.stderr is not None
            said = [job.stderr.readline()]
            deadline = time.monotonic() + SLOW
            while said[-1] and "waiting for it to finish" not in said[-1] and time.monotonic() < deadline:
                said.append(job.stderr.readline())
            assert f"is working on {model.name} in {work}; waiting for it to finish" in said[-1], "".join(said)
            time.sleep(QUICK)
            assert job.poll() is None
            # Before any stage or the output folder: nothing of the job's own is there yet.
            assert sorted(p.name for p in work.iterdir()) == [LOCKS]
            assert not (tmp_path / "udquant-out" / model.name).exists()
            yield job, work, holder
        finally:
            if job.poll() is None:
                job.kill()


def test_the_job_waits_for_the_lock_before_any_work_then_goes_on(tmp_path):
    with job_waiting_for_the_lock(tmp_path) as (job, work, holder):
        release(holder)
        _, stderr = job.communicate(timeout=SLOW)
        assert job.returncode == 4, stderr  # the fake converter's failure: the job went on to convert
        assert "fake converter: converts nothing" in stderr
        assert list(work.glob("convert-*"))


@pytest.mark.parametrize(("signum", "returncode", "said"), [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "terminated (SIGTERM)"),
])
def test_ctrl_c_and_sigterm_end_the_wait(tmp_path, signum, returncode, said):
    with job_waiting_for_the_lock(tmp_path) as (job, work, _):
        job.send_signal(signum)
        _, stderr = job.communicate(timeout=SLOW)
        assert job.returncode == returncode, stderr
        assert f"{said}; rerun the same command" in stderr
        assert sorted(p.name for p in work.iterdir()) == [LOCKS]
