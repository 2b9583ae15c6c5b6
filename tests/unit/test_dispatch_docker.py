"""Local Docker as the real engine answers, through the real docker SDK against the fake engine on a unix socket
(tests/fakes/docker_engine.py): pulls that fail midway or go quiet, a socket this user may not open, OOM kills,
log drivers that keep no log, a front end finding a user's jobs again, and Ctrl-C while following."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from huggingface_hub import constants

from tests.fakes.docker_engine import FakeDockerEngine
from tests.fakes.hub_jobs import HubJobs
from tests.unit.conftest import HF_TOKEN
from udquant.cli import main
from udquant.dispatch.base import DispatchError, DispatchRequest, JobHandle, JobStatus, make_request
from udquant.dispatch.cli import add_dispatch_command, follow
from udquant.dispatch.docker_backend import DockerBackend
from udquant.dispatch.docker_engine import connect, engine_available

IMAGE = "ghcr.io/udquant/udquant-job:0.1.0"
LINK = "https://huggingface.co/alice/Distill-8B-UD-GGUF"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _paths(engine: FakeDockerEngine, prefix: str) -> list[str]:
    return [path for _, path, _ in engine.state.requests if path.startswith(prefix)]


def _running(engine: FakeDockerEngine) -> list[str]:
    return [cid for cid, c in list(engine.state.containers.items()) if c["State"]["Running"]]


def _dispatch(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="udquant")
    add_dispatch_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["dispatch", "--backend", "docker", "someone/Distill-8B", *argv])


def _finish_when_running(engine: FakeDockerEngine, exit_code: int, stdout: list[str]) -> threading.Thread:
    """End the job once it runs and its status has been looked at (so `--wait` is following it)."""
    def finish() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            running = _running(engine)
            if running and _paths(engine, f"/containers/{running[0]}/json"):
                engine.finish(running[0], exit_code, stdout=stdout)
                return
            time.sleep(0.02)

    finisher = threading.Thread(target=finish)
    finisher.start()
    return finisher


# -- pulling the image ----------------------------------------------------------------------------------
def test_a_pull_that_fails_midway_says_why(engine: FakeDockerEngine, job_request: DispatchRequest) -> None:
    """The engine answers 200 and streams progress, then an error entry: its text, not "No such image"."""
    engine.state.pull_error = ("failed to register layer: write /var/lib/docker/overlay2/4f4fb700ef54/diff/app/"
                               "llama-quantize: no space left on device")
    with pytest.raises(DispatchError, match=f"pulling {IMAGE} failed: failed to register layer: .* no space left on "
                                            "device") as caught:
        DockerBackend(HF_TOKEN).start(job_request)
    assert "No such image" not in str(caught.value)
    assert caught.value.hint is not None and "free disk space" in caught.value.hint
    assert len(_paths(engine, "/images/create")) == 1  # one pull, not a second one by containers.run
    assert _paths(engine, "/containers/create") == [] and engine.state.containers == {}


def test_a_pull_cut_off_midway_is_a_dispatch_error(engine: FakeDockerEngine, job_request: DispatchRequest) -> None:
    engine.state.pull_cut = True
    with pytest.raises(DispatchError, match=f"pulling {IMAGE} failed: .*(Connection broken|IncompleteRead)"):
        DockerBackend(HF_TOKEN).start(job_request)
    assert engine.state.containers == {}


def test_a_pull_reports_each_layer_and_runs_once_pulled(engine: FakeDockerEngine, job_request: DispatchRequest,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="udquant")
    handle = DockerBackend(HF_TOKEN).start(job_request)
    assert f"pulling {IMAGE} (not on this machine yet)" in caplog.text
    assert f"{IMAGE}: layer 4f4fb700ef54 pull complete (1 of 2)" in caplog.text
    assert f"{IMAGE}: layer a3ed95caeb02 pull complete (2 of 2)" in caplog.text
    calls = [(method, path.split("?")[0]) for method, path, _ in engine.state.requests]
    # Looked for, pulled once, then created and started once: no "No such image" round.
    assert calls.index(("GET", f"/images/{IMAGE}/json")) < calls.index(("POST", "/images/create")) \
        < calls.index(("POST", "/containers/create"))
    assert calls.count(("POST", "/containers/create")) == 1
    assert engine.state.containers[handle.job_id]["State"]["Running"]
    assert HF_TOKEN not in caplog.text


def test_a_pull_quiet_longer_than_the_client_timeout_goes_on(engine: FakeDockerEngine,
                                                             job_request: DispatchRequest) -> None:
    """The engine sends nothing while it unpacks a big layer: the pull has no read timeout, other calls keep theirs."""
    engine.state.pull_pause = 1.5
    client = connect(timeout=1)
    assert client.api.timeout == 1
    handle = DockerBackend(HF_TOKEN, client=client).start(job_request)
    assert engine.state.containers[handle.job_id]["State"]["Running"]


# -- reaching the engine ----------------------------------------------------------------------------------
PROBE = """
import json, logging, sys
from udquant.dispatch.base import DispatchError
from udquant.dispatch.docker_engine import connect, engine_available
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
available = engine_available()
try:
    connect()
    error = None
except DispatchError as err:
    error = [str(err), err.hint]
print(json.dumps({"available": available, "error": error}))
"""


def test_a_socket_this_user_may_not_open_is_not_an_engine_missing(engine: FakeDockerEngine, tmp_path: Path) -> None:
    """The engine runs, its socket refuses this user: the hint is the docker group, not "start Docker". As root,
    which opens any file, the probe runs without the capabilities that let it (the socket's mode is kept)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("as root, setpriv is needed to run without CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    engine.socket_path.chmod(0)
    try:
        environment = {**os.environ, "DOCKER_HOST": engine.docker_host, "HOME": str(tmp_path)}
        probe = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                               cwd=tmp_path, env=environment)
    finally:
        engine.socket_path.chmod(0o660)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["available"] is False
    message, hint = result["error"]
    assert message.startswith(f"docker: no permission to use the Docker engine at {engine.docker_host}: ")
    assert "Permission denied" in message
    assert "docker group" in hint and "DOCKER_HOST" in hint and "start Docker" not in hint
    # engine_available says why, once, as a warning: the engine is there, the user cannot use it.
    assert probe.stderr.count("WARNING local Docker is not available: docker: no permission to use") == 1
    assert engine_available()  # the engine itself answers, as it did all along


def test_no_engine_is_logged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="udquant")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    assert not engine_available() and not engine_available()
    (record,) = [r for r in caplog.records if "local Docker is not available" in r.message]
    assert record.levelno == logging.INFO
    assert f"no Docker engine answers at unix://{tmp_path}/no-engine.sock" in record.message
    assert "start Docker" in record.message
    with pytest.raises(DispatchError, match="no Docker engine answers") as caught:
        DockerBackend(HF_TOKEN)
    assert caught.value.hint == "start Docker, or set DOCKER_HOST to the engine's socket"


# -- what the engine says about a job ----------------------------------------------------------------------
def test_exit_0_with_a_child_killed_for_memory_completed(engine: FakeDockerEngine,
                                                         job_request: DispatchRequest) -> None:
    """OOMKilled is set for any process the kernel killed, also a child the job survived."""
    engine.state.images.add(IMAGE)
    backend = DockerBackend(HF_TOKEN)
    survived = backend.start(job_request)
    engine.finish(survived.job_id, 0, stdout=[LINK], oom_killed=True)
    assert backend.status(survived) == JobStatus("completed", "exited 0")
    assert backend.result_link(survived) == LINK
    killed = backend.start(job_request)
    engine.finish(killed.job_id, 137, oom_killed=True)
    assert backend.status(killed) == JobStatus("failed", "killed for lack of memory (OOMKilled), exit code 137")


def test_no_nvidia_runtime_says_what_to_install(engine: FakeDockerEngine, job_request: DispatchRequest) -> None:
    engine.state.images.add(IMAGE)
    engine.state.start_error = 'could not select device driver "" with capabilities: [[gpu]]'
    with pytest.raises(DispatchError, match='starting the job\'s container failed: could not select device driver ""'
                                            r" with capabilities: \[\[gpu\]\]") as caught:
        DockerBackend(HF_TOKEN).start(job_request)
    assert caught.value.status_code == 400  # moby's InvalidParameter
    assert caught.value.hint is not None and "NVIDIA Container Toolkit" in caught.value.hint
    assert engine.state.containers == {}


def test_cancelling_an_ended_job_is_no_error(engine: FakeDockerEngine, job_request: DispatchRequest) -> None:
    engine.state.images.add(IMAGE)
    backend = DockerBackend(HF_TOKEN)
    handle = backend.start(job_request)
    engine.finish(handle.job_id, 0, stdout=[LINK])
    backend.cancel(handle)  # the engine answers 304 Not Modified
    assert _paths(engine, f"/containers/{handle.job_id}/stop") == [f"/containers/{handle.job_id}/stop?t=30"]
    assert backend.status(handle).state == "completed"


# -- a log that cannot be read -------------------------------------------------------------------------------
@pytest.mark.parametrize(("exit_code", "state"), [(0, "completed"), (5, "failed")])
def test_no_log_to_read_still_releases_the_container(
        exit_code: int, state: str, engine: FakeDockerEngine, jobs: HubJobs, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """The log driver `none` keeps no log (the engine answers 501): the link is the output repo's page, and the
    container, which holds the token, goes all the same."""
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.chdir(tmp_path)
    engine.state.images.add(IMAGE)
    engine.state.log_driver = "none"
    args = _dispatch(["--wait", "--poll", "0.02"])
    finisher = _finish_when_running(engine, exit_code, [LINK])
    if state == "completed":
        assert args.func(args) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"{constants.ENDPOINT}/alice/Distill-8B-UD-GGUF"
    else:
        with pytest.raises(DispatchError, match="ended failed: exited, exit code 5"):
            args.func(args)
    finisher.join()
    assert "configured logging driver does not support reading" in caplog.text
    assert _paths(engine, "/containers/create") and engine.state.containers == {}


def test_the_link_without_a_log_is_the_output_repos_page(engine: FakeDockerEngine, job_request: DispatchRequest,
                                                         tmp_path: Path) -> None:
    """What the Space reads directly: result_link and release of a job whose log cannot be read."""
    engine.state.images.add(IMAGE)
    engine.state.log_driver = "none"
    backend = DockerBackend(HF_TOKEN, failed_log_dir=tmp_path / "logs")
    completed, failed = backend.start(job_request), backend.start(job_request)
    engine.finish(completed.job_id, 0, stdout=[LINK])
    engine.finish(failed.job_id, 5)
    assert backend.result_link(completed) == f"{constants.ENDPOINT}/alice/Distill-8B-UD-GGUF"
    backend.release(completed)
    backend.release(failed)
    assert engine.state.containers == {} and not (tmp_path / "logs").exists()


# -- finding a user's jobs again -------------------------------------------------------------------------------
def test_a_front_end_finds_a_users_jobs_and_removes_the_ended_ones(engine: FakeDockerEngine, tmp_path: Path) -> None:
    engine.state.images.add(IMAGE)
    alice = DockerBackend(HF_TOKEN, user="alice", failed_log_dir=tmp_path / "logs")
    bob = DockerBackend(HF_TOKEN, user="bob", failed_log_dir=tmp_path / "logs")
    unlabelled = DockerBackend(HF_TOKEN)  # the CLI's: no user
    default_repo = make_request("someone/Distill-8B", None)  # the job's default, <namespace>/<Name>-UD-GGUF
    named = make_request("someone/Other-8B", "alice", output_repo="alice/my-quants")
    first, completed, failed, newest = (alice.start(default_repo), alice.start(named), alice.start(named),
                                        alice.start(named))
    bobs, anonymous = bob.start(named), unlabelled.start(named)
    labels = engine.state.containers[first.job_id]["Config"]["Labels"]
    assert labels["org.udquant.user"] == "alice" and "org.udquant.output-repo" not in labels
    assert "org.udquant.user" not in engine.state.containers[anonymous.job_id]["Config"]["Labels"]
    engine.finish(completed.job_id, 0, stdout=[LINK])
    engine.finish(failed.job_id, 5, stderr=["ERROR quantize: out of disk"])

    found = alice.running_jobs("alice")
    assert [handle.job_id for handle in found] == [newest.job_id, first.job_id]  # newest first
    assert found[1].output_repo == "alice/Distill-8B-UD-GGUF" and found[0].output_repo == "alice/my-quants"
    assert found[0] == newest
    listed = [json.loads(parse_qs(urlparse(path).query)["filters"][0]) for path in _paths(engine, "/containers/json")]
    assert listed[0] == {"label": ["org.udquant.job=udquant-job", "org.udquant.user=alice"],
                         "status": ["created", "restarting", "running", "paused"]}

    assert sorted(alice.remove_ended("alice")) == sorted([completed.job_id, failed.job_id])
    assert set(engine.state.containers) == {first.job_id, newest.job_id, bobs.job_id, anonymous.job_id}
    saved = (tmp_path / "logs" / f"udquant-job-{failed.job_id[:12]}.log").read_text()
    assert "ERROR quantize: out of disk" in saved
    assert alice.remove_ended("alice") == [] and alice.remove_ended("carol") == []
    assert [handle.job_id for handle in bob.running_jobs("bob")] == [bobs.job_id]


# -- following from the CLI --------------------------------------------------------------------------------------
class InterruptedBackend:
    """Ctrl-C while --wait looks at the job."""

    name = "docker"

    def __init__(self) -> None:
        self.released: list[JobHandle] = []

    def status(self, handle: JobHandle) -> JobStatus:
        raise KeyboardInterrupt

    def release(self, handle: JobHandle) -> None:
        self.released.append(handle)


def test_ctrl_c_while_following_leaves_the_job_and_says_how_to_reach_it(capsys: pytest.CaptureFixture[str]) -> None:
    backend = InterruptedBackend()
    handle = JobHandle("docker", "0123456789abcdef", "unix:///var/run/docker.sock", "alice/X-UD-GGUF")
    try:
        code = follow(backend, handle, argparse.Namespace(poll=0.0, wait_timeout=None, tail=5))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C went on to the job CLI, which says to rerun the command: a second job")
    assert code == 130
    err = capsys.readouterr().err
    assert "stopped following docker job 0123456789abcdef, which goes on running" in err
    assert "`docker logs -f 0123456789ab`" in err and "`docker stop 0123456789ab`" in err and "docker rm" in err
    assert backend.released == []  # it runs: nothing to release


def test_sigint_during_dispatch_wait(engine: FakeDockerEngine, jobs: HubJobs, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A real SIGINT to this process while `udquant dispatch --wait` follows: exit 130, the container runs on,
    and no advice to run the command again."""
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.chdir(tmp_path)
    engine.state.images.add(IMAGE)
    main_thread = threading.main_thread().ident
    assert main_thread is not None and threading.current_thread() is threading.main_thread()

    def interrupt_when_followed() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            running = _running(engine)
            # The first look at the container is the SDK's own, inside containers.run; the second is --wait's.
            if running and len(_paths(engine, f"/containers/{running[0]}/json")) >= 2:
                signal.pthread_kill(main_thread, signal.SIGINT)
                return
            time.sleep(0.02)

    interrupter = threading.Thread(target=interrupt_when_followed)
    interrupter.start()
    try:
        code = main(["dispatch", "--backend", "docker", "someone/Distill-8B", "--wait", "--poll", "0.05"])
    finally:
        interrupter.join()
    err = capsys.readouterr().err
    assert code == 130
    assert "stopped following docker job" in err and "rerun" not in err
    (running,) = _running(engine)  # the job goes on
    assert f"`docker stop {running[:12]}`" in err


def test_cancel_removes_a_container_that_never_started(engine: FakeDockerEngine,
                                                       job_request: DispatchRequest) -> None:
    """stop leaves a created container where it is; it would hold the token, and the user's slot in a Space."""
    backend = DockerBackend(HF_TOKEN, user="alice")
    engine.state.images.add(IMAGE)
    created = backend._client.containers.create(IMAGE, labels=backend.container_spec(job_request)["labels"])
    (handle,) = backend.running_jobs("alice")
    assert handle.job_id == created.id
    backend.cancel(handle)
    assert created.id not in engine.state.containers and backend.running_jobs("alice") == []


def test_one_container_that_cannot_be_removed_does_not_stop_the_others(
        engine: FakeDockerEngine, job_request: DispatchRequest, caplog: pytest.LogCaptureFixture) -> None:
    backend = DockerBackend(HF_TOKEN, user="alice")
    first, second = backend.start(job_request), backend.start(job_request)
    engine.finish(first.job_id, 0)
    engine.finish(second.job_id, 0)
    engine.state.containers[second.job_id]["State"]["Running"] = True  # the engine refuses its removal (409)
    engine.state.containers[second.job_id]["State"]["Status"] = "exited"
    assert backend.remove_ended("alice") == [first.job_id]
    assert f"cannot remove the ended container {second.job_id[:12]}" in caplog.text
