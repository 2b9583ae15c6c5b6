"""Dispatch backends through their real clients (huggingface_hub, docker SDK, httpx) against fakes at
the boundary: Hub jobs endpoints on the local Hub test server, a Docker Engine on a unix socket, a
GitHub API on 127.0.0.1. Checked: the exact image, command, GPU request, env and secrets sent, and
that the token is never where it should not be."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from tests.fakes.docker_engine import FakeDockerEngine
from tests.fakes.github_api import FakeGitHub
from tests.fakes.hub_jobs import HubJobs
from tests.fakes.hub_models import add_distill
from tests.hubserver import HubServer
from tests.unit.conftest import HF_TOKEN
from udquant.dispatch.base import (
    DispatchError,
    DispatchRequest,
    JobHandle,
    JobStatus,
    link_from_logs,
    make_request,
    redact,
)
from udquant.dispatch.cli import _namespace as hub_namespace
from udquant.dispatch.cli import add_dispatch_command, follow, request_from_args
from udquant.dispatch.docker_backend import DockerBackend
from udquant.dispatch.docker_engine import engine_available
from udquant.dispatch.estimate import Hardware, bits_per_weight, estimate_flavors, eval_cost, output_bytes
from udquant.dispatch.github import GitHubBackend
from udquant.dispatch.hf_jobs import HfJobsBackend, describe_hardware, list_hardware
from udquant.dispatch.job_command import (
    build_job_args,
    build_workflow_inputs,
    default_image,
    image_name,
    image_tag,
)
from udquant.dispatch.preview import inspect_repo
from udquant.dispatch.queue import JobRegistry, QueueLimitError
from udquant.errors import HubError, InputError
from udquant.recipe import load_recipe_ref

GH_TOKEN = "ghp_DispatchSecretToken0123456789abcdef"
IMAGE = "ghcr.io/udquant/udquant-job:0.1.0"
JOB_ARGS = ["someone/Distill-8B", "--quant", "UD-Q5_K_XL", "--quant", "UD-Q4_K_XL", "--recipe", "auto",
            "--imatrix", "auto", "--upload", "--private"]


@pytest.fixture
def request_two_levels() -> DispatchRequest:
    return make_request("someone/Distill-8B", "alice", levels=["UD-Q5_K_XL", "UD-Q4_K_XL"], private=True)


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with FakeGitHub() as fake:
        fake.state.tokens.add(GH_TOKEN)
        yield fake


def _assert_no_token(value: object, token: str) -> None:
    assert token not in json.dumps(value, default=str)


# -- the request and the one command line ------------------------------------------------------------
def test_job_args_are_the_single_command_line(request_two_levels: DispatchRequest) -> None:
    assert request_two_levels.image == IMAGE == default_image()
    assert build_job_args(request_two_levels) == ["udquant-job", *JOB_ARGS]
    # The default repo is known here for the link, but left to the job: named, the job would publish
    # into a repo of that name that udquant did not make.
    assert request_two_levels.output_repo == "alice/Distill-8B-UD-GGUF"
    assert not request_two_levels.output_repo_named


def test_job_args_without_output_repo_or_private() -> None:
    request = make_request("someone/Distill-8B", None, recipe="generic/UD-Q4_K_XL", levels=["UD-Q4_K_XL"],
                           imatrix="none")
    assert build_job_args(request) == ["udquant-job", "someone/Distill-8B", "--quant", "UD-Q4_K_XL",
                                       "--recipe", "generic/UD-Q4_K_XL", "--imatrix", "none", "--upload"]


def test_the_job_runs_whether_its_command_replaces_the_entrypoint_or_follows_it(
        request_two_levels: DispatchRequest, capsys: pytest.CaptureFixture[str]) -> None:
    """HF Jobs is sent the whole command line; a runner that appends it to ENTRYPOINT ["udquant-job"] gives the job
    its own name first. Either way the job reads the same arguments; a local folder named udquant-job stays one."""
    from udquant.cli import _without_own_name, job_main

    command = build_job_args(request_two_levels)
    assert _without_own_name(command[1:], "udquant-job") == command[1:]  # command replaced the entrypoint
    assert _without_own_name(command, "udquant-job") == command[1:]  # command appended to it
    assert _without_own_name(["udquant-job", "--no-upload"], "udquant-job") == ["udquant-job", "--no-upload"]
    assert job_main(["udquant-job", "./no-such-model", "--no-upload"]) == 2
    assert "./no-such-model: no such directory" in capsys.readouterr().err


def test_job_args_parse_with_the_jobs_own_parser(request_two_levels: DispatchRequest) -> None:
    """The contract with udquant-job: every argument is one it knows, with the meaning intended."""
    from udquant.cli import add_job_arguments

    parser = argparse.ArgumentParser(prog="udquant-job")
    add_job_arguments(parser)
    args = parser.parse_args(build_job_args(request_two_levels)[1:])
    assert (args.source, args.levels, args.recipe, args.imatrix) == (
        "someone/Distill-8B", ["UD-Q5_K_XL", "UD-Q4_K_XL"], "auto", "auto")
    assert (args.upload, args.output_repo, args.private, args.evaluate) == (True, None, True, False)
    named = make_request("someone/Distill-8B", None, output_repo="team/Mine")
    assert parser.parse_args(build_job_args(named)[1:]).output_repo == "team/Mine"
    measured = make_request("someone/Distill-8B", "alice", evaluate=True)
    assert build_job_args(measured)[-1] == "--eval" and parser.parse_args(build_job_args(measured)[1:]).evaluate


def test_image_tag() -> None:
    assert image_tag("ghcr.io/udquant/udquant-job:0.1.0") == "0.1.0"
    assert image_name("ghcr.io/udquant/udquant-job:0.1.0") == "ghcr.io/udquant/udquant-job"
    assert image_name("localhost:5000/udquant-job:1.2@sha256:" + "0" * 64) == "localhost:5000/udquant-job"
    assert image_name("localhost:5000/udquant-job") == "localhost:5000/udquant-job"
    assert image_tag("localhost:5000/udquant-job") == "latest"
    assert image_tag("localhost:5000/udquant-job:1.2@sha256:" + "0" * 64) == "1.2"


def test_workflow_inputs(request_two_levels: DispatchRequest) -> None:
    assert build_workflow_inputs(request_two_levels) == {
        "repo": "someone/Distill-8B", "levels": "UD-Q5_K_XL UD-Q4_K_XL", "recipe": "auto", "imatrix": "auto",
        "private": "true", "eval": "false", "image-tag": "0.1.0"}
    measured = make_request("someone/Distill-8B", None, evaluate=True)
    assert build_workflow_inputs(measured)["eval"] == "true"


@pytest.mark.parametrize("changes", [
    {"repo_id": "--help/x"}, {"repo_id": "owner/name; rm -rf /"}, {"repo_id": "../etc"},
    {"output_repo": "alice/x y"}, {"levels": ()}, {"levels": ("UD-Q9_K_XXL",)}, {"levels": ("--quant",)},
    {"levels": ("UD-Q5_K_XL", "UD-Q5_K_XL")}, {"recipe": "/etc/passwd"}, {"recipe": "generic/../../x"},
    {"recipe": "generic/UD-Q5_K_XL", "levels": ("UD-Q5_K_XL", "UD-Q4_K_XL")}, {"imatrix": "/tmp/x.dat"},
    {"image": "ghcr.io/udquant/udquant-job:0.1.0 --privileged"}, {"image": "UPPER/Case"},
])
def test_requests_are_validated_when_made(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {"repo_id": "someone/Distill-8B", "output_repo": "alice/Distill-8B-UD-GGUF"}
    with pytest.raises(InputError):
        DispatchRequest(**(fields | changes))  # type: ignore[arg-type]


def test_a_named_recipe_makes_its_own_level_only() -> None:
    """The job refuses --recipe with any other --quant: no level given means the recipe's, not the default."""
    request = make_request("someone/Distill-8B", None, recipe="llama/UD-Q4_K_XL")
    assert request.levels == ("UD-Q4_K_XL",)
    assert build_job_args(request)[2:6] == ["--quant", "UD-Q4_K_XL", "--recipe", "llama/UD-Q4_K_XL"]
    assert make_request("someone/Distill-8B", None).levels == ("UD-Q5_K_XL",)
    with pytest.raises(InputError, match="recipe llama/UD-Q4_K_XL makes UD-Q4_K_XL, and --quant asks for "
                                         "UD-Q5_K_XL") as refused:
        make_request("someone/Distill-8B", None, recipe="llama/UD-Q4_K_XL", levels=["UD-Q5_K_XL"])
    assert refused.value.hint == "give --recipe alone, or with --quant UD-Q4_K_XL"
    with pytest.raises(InputError, match="makes UD-Q4_K_XL"):
        DispatchRequest(repo_id="someone/Distill-8B", recipe="llama/UD-Q4_K_XL")  # the default level
    args = _dispatch_parser().parse_args(["dispatch", "--backend", "github", "someone/Distill-8B",
                                          "--recipe", "llama/UD-Q4_K_XL"])
    assert request_from_args(args).levels == ("UD-Q4_K_XL",)


def test_link_and_redaction_helpers() -> None:
    assert link_from_logs(["INFO done", "https://huggingface.co/alice/X-UD-GGUF", ""]) == \
        "https://huggingface.co/alice/X-UD-GGUF"
    assert link_from_logs(["see https://example.org/a", "INFO no link on the last line"]) is None
    assert redact(f"token={HF_TOKEN}!", [HF_TOKEN, None]) == "token=***!"


# -- HF Jobs ------------------------------------------------------------------------------------------
def test_hf_jobs_sends_image_command_flavor_and_token_as_secret(jobs: HubJobs, hub: HubServer,
                                                                request_two_levels: DispatchRequest,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = HfJobsBackend(HF_TOKEN, flavor="l40sx1", timeout="2h")
    handle = backend.start(request_two_levels)
    (spec,) = jobs.created
    assert spec["dockerImage"] == IMAGE
    assert spec["command"] == ["udquant-job", *JOB_ARGS]
    assert spec["flavor"] == "l40sx1"
    assert spec["timeoutSeconds"] == 7200
    assert spec["secrets"] == {"HF_TOKEN": HF_TOKEN}
    assert spec["environment"] == {"UDQUANT_NO_PROGRESS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    assert spec["labels"]["app"] == "udquant"
    _assert_no_token({k: v for k, v in spec.items() if k != "secrets"}, HF_TOKEN)
    assert handle == JobHandle("hf-jobs", handle.job_id, "alice", "alice/Distill-8B-UD-GGUF",
                               f"{hub.url}/jobs/alice/{handle.job_id}")
    _assert_no_token(handle, HF_TOKEN)
    states = [backend.status(handle).state for _ in range(3)]
    assert states == ["running", "running", "completed"]
    lines = backend.logs(handle, tail=2)
    assert lines[-1] == f"{hub.url}/alice/Distill-8B-UD-GGUF"
    assert len(lines) == 2
    assert backend.result_link(handle) == f"{hub.url}/alice/Distill-8B-UD-GGUF"
    assert HF_TOKEN not in caplog.text


def test_hf_jobs_cancel_and_running_jobs(jobs: HubJobs, request_two_levels: DispatchRequest) -> None:
    backend = HfJobsBackend(HF_TOKEN)
    handle = backend.start(request_two_levels)
    named = make_request("someone/Other-8B", "alice", output_repo="alice/my-quants")
    time.sleep(0.01)  # the Hub's creation times have millisecond resolution
    newer = backend.start(named)
    # What a front end that restarted follows: the same handles, newest first.
    assert backend.running_jobs() == [newer, handle]
    assert handle.output_repo == "alice/Distill-8B-UD-GGUF" and newer.output_repo == "alice/my-quants"
    backend.cancel(newer)
    backend.cancel(handle)
    assert backend.status(handle).state == "canceled"
    assert backend.running_jobs() == []
    assert backend.result_link(handle) is None


def test_hf_jobs_failure_and_bad_token(jobs: HubJobs, request_two_levels: DispatchRequest) -> None:
    jobs.progression = ["SCHEDULING", "RUNNING", "ERROR"]
    backend = HfJobsBackend(HF_TOKEN)
    handle = backend.start(request_two_levels)
    assert [backend.status(handle).state for _ in range(2)] == ["running", "failed"]
    with pytest.raises(DispatchError) as caught:
        HfJobsBackend("hf_wrong_token").start(request_two_levels)
    assert caught.value.status_code == 401
    assert "hf_wrong_token" not in str(caught.value)
    with pytest.raises(DispatchError, match="token is needed"):
        HfJobsBackend("")


def test_hf_jobs_without_an_answer_fail_as_passing_dispatch_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """No answer at all is a DispatchError without a status (so --wait looks again), whatever HTTP client
    huggingface_hub uses (httpx2 since 2.0, whose errors are not httpx's)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once the probe is closed
    backend = HfJobsBackend(HF_TOKEN, namespace="alice", endpoint=closed)
    with pytest.raises(DispatchError, match="inspect_job failed") as caught:
        backend.status(JobHandle("hf-jobs", "j1", "alice", None))
    assert caught.value.status_code is None and HF_TOKEN not in str(caught.value)
    with pytest.raises(DispatchError, match="listing hardware failed"):
        list_hardware(HF_TOKEN, endpoint=closed)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(HubError, match="cannot reach the Hub at .* to check the token in HF_TOKEN"):
        hub_namespace(HF_TOKEN)


def test_whoami_tells_a_refused_token_from_offline_mode(jobs: HubJobs, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubError, match=r"the Hub refused the token in HF_TOKEN \(HTTP 401\)") as refused:
        hub_namespace("hf_wrong_token")
    assert refused.value.exit_code == 9
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="dispatching needs the Hub, and HF_HUB_OFFLINE is set") as offline:
        hub_namespace(HF_TOKEN)
    assert offline.value.hint == "unset HF_HUB_OFFLINE" and "refused" not in str(offline.value)


def test_hardware_list_and_estimates(jobs: HubJobs) -> None:
    flavors = {info.name: describe_hardware(info) for info in list_hardware(HF_TOKEN)}
    a10g = flavors["a10g-large"]
    assert (a10g.gpu_model, a10g.gpu_count, a10g.vram_bytes, a10g.cpus) == ("A10G", 1, 24e9, 12)
    assert a10g.cost_usd_per_minute == pytest.approx(0.025)
    estimates = estimate_flavors(list(flavors.values()), 8_000_000_000, [5_500_000_000])
    assert "cpu-basic" not in [e.hardware.name for e in estimates]  # GPU flavors only
    # t4-small is left out: the image has no kernels for its GPU (compute capability 7.5).
    assert [e.hardware.name for e in estimates] == ["a10g-large", "l40sx1", "h200"]
    for e in estimates:
        assert e.cost_usd == pytest.approx(e.minutes * e.hardware.cost_usd_per_minute)


def test_estimate_sizes_and_small_disk() -> None:
    recipe = load_recipe_ref("generic/UD-Q5_K_XL")
    assert bits_per_weight(recipe) == 5.5  # q5_K: 176 bytes per 256 weights
    assert output_bytes(8_000_000_000, 5.5) == 5_500_000_000
    tiny_disk = Hardware("x", "X", 4, 16e9, 20e9, "L4", 1, 24e9, 0.01)
    (estimate,) = estimate_flavors([tiny_disk], 8_000_000_000, [5_500_000_000])
    assert not estimate.fits and "disk" in estimate.note
    slow = Hardware("a10g", "A10G", 4, 16e9, 0, "A10G", 1, 24e9, 0.01)  # three levels of 400 B on one A10G
    (estimate,) = estimate_flavors([slow], 400_000_000_000, [275_000_000_000] * 3)
    assert estimate.minutes > 8 * 60 and not estimate.fits and "past the 8 h time limit" in estimate.note
    assert "partial offload" in estimate.note


def test_inspect_reads_architecture_params_base_model_and_recipes(jobs: HubJobs, hub: HubServer) -> None:
    add_distill(hub.state, "someone/Distill-8B", base_model="meta-llama/Llama-3.1-8B")
    found = inspect_repo("someone/Distill-8B", token=None, levels=("UD-Q5_K_XL", "UD-Q4_K_XL"), imatrix="auto")
    assert (found.hf_architecture, found.llama_arch) == ("LlamaForCausalLM", "llama")
    assert found.n_params == 8_030_261_248
    assert found.base_models == ("meta-llama/Llama-3.1-8B",)
    assert "mradermacher" in found.imatrix_source
    assert [level.level for level in found.levels] == ["UD-Q5_K_XL", "UD-Q4_K_XL"]
    assert all(level.recipe_id.endswith(level.level) for level in found.levels)
    assert found.levels[0].output_bytes == output_bytes(found.n_params, found.levels[0].bits_per_weight)


# -- Docker -------------------------------------------------------------------------------------------
def test_docker_pulls_and_runs_with_all_gpus_cache_volume_and_token_in_env_only(
        engine: FakeDockerEngine, request_two_levels: DispatchRequest, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = DockerBackend(HF_TOKEN)
    handle = backend.start(request_two_levels)
    calls = [(method, path.split("?")[0]) for method, path, _ in engine.state.requests]
    assert ("POST", "/images/create") in calls  # the image was missing: pulled, then created again
    pulls = [path for method, path, _ in engine.state.requests if path.startswith("/images/create")]
    assert pulls == ["/images/create?tag=0.1.0&fromImage=ghcr.io%2Fudquant%2Fudquant-job"] or \
        pulls == ["/images/create?fromImage=ghcr.io%2Fudquant%2Fudquant-job&tag=0.1.0"]
    create = [body for method, path, body in engine.state.requests if path.startswith("/containers/create")][-1]
    assert create is not None
    assert create["Image"] == IMAGE
    assert create["Entrypoint"] == ["udquant-job"]
    assert create["Cmd"] == JOB_ARGS
    assert create["HostConfig"]["DeviceRequests"] == [
        {"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    # The volume the README and quantize.yml mount: the image's HF_HOME and work dir live in it.
    assert create["HostConfig"]["Binds"] == ["udquant-data:/data:rw"]
    assert create["HostConfig"]["Init"] is True  # as `docker run --init` in the README and quantize.yml
    assert sorted(create["Env"]) == sorted(["UDQUANT_NO_PROGRESS=1", "HF_HUB_DISABLE_TELEMETRY=1",
                                            f"HF_TOKEN={HF_TOKEN}"])
    assert create["Labels"] == {"org.udquant.job": "udquant-job", "org.udquant.version": "0.1.0",
                                "org.udquant.repo": "someone/Distill-8B",
                                "org.udquant.output-repo": "alice/Distill-8B-UD-GGUF"}
    _assert_no_token({k: v for k, v in create.items() if k != "Env"}, HF_TOKEN)
    _assert_no_token(handle, HF_TOKEN)
    assert backend.status(handle).state == "running"
    engine.finish(handle.job_id, 0, stdout=["https://huggingface.co/alice/Distill-8B-UD-GGUF"],
                  stderr=["INFO verify: every tensor has the recipe's type"])
    assert backend.status(handle).state == "completed"
    assert backend.logs(handle, tail=2) == ["INFO verify: every tensor has the recipe's type",
                                            "https://huggingface.co/alice/Distill-8B-UD-GGUF"]
    assert backend.result_link(handle) == "https://huggingface.co/alice/Distill-8B-UD-GGUF"
    backend.release(handle)  # the result is read: the container goes, the volume stays
    assert handle.job_id not in engine.state.containers
    assert HF_TOKEN not in caplog.text


def test_docker_stop_and_failure(engine: FakeDockerEngine, request_two_levels: DispatchRequest, tmp_path) -> None:
    engine.state.images.add(IMAGE)
    backend = DockerBackend(HF_TOKEN, failed_log_dir=tmp_path / "logs")
    handle = backend.start(request_two_levels)
    assert not any(path.startswith("/images/create") for _, path, _ in engine.state.requests)
    backend.cancel(handle)
    assert ("POST", f"/containers/{handle.job_id}/stop?t=30") in [(m, p) for m, p, _ in engine.state.requests]
    assert backend.status(handle).state == "canceled"
    killed = backend.start(request_two_levels)  # `docker kill` or the host's OOM killer, unflagged: exit 137 too
    engine.finish(killed.job_id, 137, stderr=["INFO quantize: UD-Q5_K_XL"])
    assert backend.status(killed).state == "canceled"
    backend.release(killed)  # its log is all that tells what happened: kept
    assert "INFO quantize: UD-Q5_K_XL" in (tmp_path / "logs" / f"udquant-job-{killed.job_id[:12]}.log").read_text()
    failing = backend.start(request_two_levels)
    engine.finish(failing.job_id, 5, stderr=[f"ERROR verification failed (token {HF_TOKEN} echoed by mistake)"])
    assert backend.status(failing) == backend.status(failing)
    assert backend.status(failing).state == "failed"
    assert HF_TOKEN not in "\n".join(backend.logs(failing))  # redacted even if the job printed it
    assert backend.result_link(failing) is None
    backend.release(failing)
    # The engine stored the token with the container: it goes, its whole log (redacted) is kept.
    assert failing.job_id not in engine.state.containers
    saved = (tmp_path / "logs" / f"udquant-job-{failing.job_id[:12]}.log").read_text()
    assert "INFO resolve: started" in saved and "ERROR verification failed" in saved and HF_TOKEN not in saved
    with pytest.raises(DispatchError) as caught:
        backend.status(JobHandle("docker", "nope", "", None))
    assert caught.value.status_code == 404
    running = backend.start(request_two_levels)
    with pytest.raises(DispatchError, match="still running"):
        backend.release(running)
    engine.finish(running.job_id, 137, stderr=["INFO quantize: UD-Q5_K_XL"], oom_killed=True)
    status = backend.status(running)
    assert status.state == "failed" and "OOMKilled" in status.detail  # the kernel killed it: not a cancel


def test_docker_start_failure_leaves_no_container(engine: FakeDockerEngine,
                                                  request_two_levels: DispatchRequest) -> None:
    engine.state.images.add(IMAGE)
    engine.state.start_error = 'could not select device driver "" with capabilities: [[gpu]]'
    with pytest.raises(DispatchError, match="could not select device driver") as caught:
        DockerBackend(HF_TOKEN).start(request_two_levels)
    assert caught.value.status_code == 400  # moby's InvalidParameter
    assert engine.state.containers == {}  # the created container, which held the token, is removed


def test_docker_engine_detection(engine: FakeDockerEngine, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    assert engine_available()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    assert not engine_available()
    with pytest.raises(DispatchError, match="no Docker engine"):
        DockerBackend(HF_TOKEN)


# -- GitHub -------------------------------------------------------------------------------------------
def test_github_dispatches_quantize_workflow_and_follows_its_run(github: FakeGitHub,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    github.state.run_delay = 2  # listed late: the run's id must come from the dispatch's answer
    request = make_request("someone/Distill-8B", None, levels=["UD-Q5_K_XL", "UD-Q4_K_XL"], imatrix="auto")
    backend = GitHubBackend(GH_TOKEN, "me/udquant-runner", api_url=github.url, poll_interval=0.01)
    handle = backend.start(request)
    dispatches = [r for r in github.state.requests if r[0] == "POST"]
    assert [(method, path) for method, path, _, _ in dispatches] == [
        ("POST", "/repos/me/udquant-runner/actions/workflows/quantize.yml/dispatches")]
    _, _, headers, body = dispatches[0]
    assert body == {"ref": "main", "return_run_details": True,
                    "inputs": {"repo": "someone/Distill-8B", "levels": "UD-Q5_K_XL UD-Q4_K_XL",
                               "recipe": "auto", "imatrix": "auto", "private": "false", "eval": "false",
                               "image-tag": "0.1.0"}}
    assert headers["Authorization"] == f"Bearer {GH_TOKEN}"
    assert headers["X-GitHub-Api-Version"] == "2022-11-28"
    (run,) = github.state.runs.values()
    assert handle == JobHandle("github", str(run.id), "me/udquant-runner", None,
                               f"{github.url}/me/udquant-runner/actions/runs/{run.id}")
    assert "did not say which run" not in caplog.text
    assert backend.status(handle).state == "running"
    assert "appears when it has finished" in backend.logs(handle)[0]
    assert backend.result_link(handle) is None
    # As on GitHub: the job's stdout (its last line the link), then the steps that follow it.
    github.state.finish(run.id, "success", ["Run the job", "https://huggingface.co/me/X-UD-GGUF",
                                            "Post job cleanup.", "https://github.com/me/udquant-runner done"])
    assert backend.status(handle).state == "completed"
    assert backend.logs(handle)[-3].endswith("https://huggingface.co/me/X-UD-GGUF")
    assert backend.result_link(handle) == "https://huggingface.co/me/X-UD-GGUF"
    assert GH_TOKEN not in caplog.text


def test_github_dispatches_in_quick_succession_follow_their_own_runs(github: FakeGitHub) -> None:
    github.state.run_delay = 3  # neither run is listed yet when the other dispatch looks
    backend = GitHubBackend(GH_TOKEN, "me/runner", api_url=github.url, poll_interval=0.01)
    first = backend.start(make_request("someone/First-8B", None))
    second = backend.start(make_request("someone/Second-8B", None))
    assert first.job_id != second.job_id
    assert github.state.runs[int(first.job_id)].inputs["repo"] == "someone/First-8B"
    assert github.state.runs[int(second.job_id)].inputs["repo"] == "someone/Second-8B"


@pytest.mark.parametrize("server", ["ignored", "rejected", "rejected-400"])
def test_github_server_without_run_details_falls_back_to_the_new_run(github: FakeGitHub, server: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    github.state.run_details = server
    github.state.run_delay = 2  # the new run is listed only on the third look
    backend = GitHubBackend(GH_TOKEN, "me/runner", api_url=github.url, poll_interval=0.01)
    handle = backend.start(make_request("someone/Distill-8B", None))
    (run,) = github.state.runs.values()
    assert handle.job_id == str(run.id) and handle.url == f"{github.url}/me/runner/actions/runs/{run.id}"
    posts = [body for method, _, _, body in github.state.requests if method == "POST"]
    assert [("return_run_details" in body) for body in posts] == ([True] if server == "ignored" else [True, False])
    listings = [p for m, p, _, _ in github.state.requests if "/runs?" in p]
    assert all("event=workflow_dispatch" in p for p in listings) and len(listings) >= 3
    assert "did not say which run" in caplog.text


def test_github_cancel_failure_and_errors(github: FakeGitHub) -> None:
    request = make_request("someone/Distill-8B", None)
    backend = GitHubBackend(GH_TOKEN, "me/runner", api_url=github.url, poll_interval=0.01)
    handle = backend.start(request)
    backend.cancel(handle)
    assert backend.status(handle).state == "canceled"
    failed = backend.start(request)
    github.state.finish(int(failed.job_id), "failure", ["ERROR quantize failed"])
    assert backend.status(failed).state == "failed"
    with pytest.raises(DispatchError) as caught:
        GitHubBackend("ghp_wrong", "me/runner", api_url=github.url).start(request)
    assert caught.value.status_code == 401 and "ghp_wrong" not in str(caught.value)
    with pytest.raises(DispatchError, match="output repo"):
        backend.start(make_request("someone/Distill-8B", "alice"))
    with pytest.raises(DispatchError, match="only its tag can be chosen"):  # the workflow would run another image
        backend.start(make_request("someone/Distill-8B", None, image="registry.example/other-job:0.1.0"))
    own = backend.start(make_request("someone/Distill-8B", None, image="ghcr.io/me/udquant-job:0.2.0-rc1"))
    assert github.state.runs[int(own.job_id)].inputs["image-tag"] == "0.2.0-rc1"
    for bad in ("me", "me/runner/x", "-me/runner", "me/../x"):
        with pytest.raises(DispatchError):
            GitHubBackend(GH_TOKEN, bad, api_url=github.url)
    with pytest.raises(DispatchError):
        GitHubBackend(GH_TOKEN, "me/runner", workflow="../quantize.yml")
    for run in github.state.runs.values():  # the runs started above are all listed by now
        run.visible_after = 0
    github.state.run_details, github.state.run_delay = "ignored", 10**6
    with pytest.raises(DispatchError, match="no new run"):
        GitHubBackend(GH_TOKEN, "me/runner", api_url=github.url, find_timeout=0.05, poll_interval=0.01).start(request)


# -- queue limits -------------------------------------------------------------------------------------
def test_one_running_job_per_user() -> None:
    registry = JobRegistry()
    first = JobHandle("hf-jobs", "1", "alice", None)
    second = JobHandle("hf-jobs", "2", "alice", None)
    running = {"1": True}
    assert registry.submit("alice", lambda h: running.get(h.job_id, False), lambda: first) == first
    with pytest.raises(QueueLimitError, match="job 1"):
        registry.submit("alice", lambda h: running.get(h.job_id, False), lambda: second)
    assert registry.submit("bob", lambda h: True, lambda: second) == second  # other users are not held up
    running["1"] = False
    assert registry.submit("alice", lambda h: running.get(h.job_id, False), lambda: second) == second

    def start_again() -> JobHandle:  # a second click while the first submission is still starting
        with pytest.raises(QueueLimitError, match="in flight"):
            registry.submit("carol", lambda h: False, lambda: first)
        return first

    registry.submit("carol", lambda h: False, start_again)
    registry.finish("carol", first)
    assert registry.active("carol") is None


def test_a_job_found_running_elsewhere_holds_the_slot() -> None:
    registry = JobRegistry()
    found, other = JobHandle("hf-jobs", "1", "erin", None), JobHandle("hf-jobs", "2", "erin", None)
    assert registry.adopt("erin", found) == found
    assert registry.adopt("erin", other) == found  # the slot keeps the job it holds
    with pytest.raises(QueueLimitError, match="job 1"):
        registry.submit("erin", lambda h: True, lambda: other)


def test_a_previous_job_that_cannot_be_checked() -> None:
    registry = JobRegistry()
    first, second = JobHandle("docker", "c1", "unix://", None), JobHandle("docker", "c2", "unix://", None)
    registry.submit("dave", lambda h: True, lambda: first)

    def gone(handle: JobHandle) -> bool:
        raise DispatchError("docker", f"containers.get: No such container: {handle.job_id}", status_code=404)

    assert registry.submit("dave", gone, lambda: second) == second  # removed elsewhere: not running
    assert registry.active("dave") == second

    def unreachable(handle: JobHandle) -> bool:
        raise DispatchError("github", "a GitHub token is needed", hint="set GITHUB_TOKEN (actions: write)")

    with pytest.raises(DispatchError, match="cannot tell whether your previous job c2 still runs") as caught:
        registry.submit("dave", unreachable, lambda: first)
    assert caught.value.hint == "set GITHUB_TOKEN (actions: write)"
    assert str(caught.value).count("github:") == 1
    assert registry.active("dave") == second


# -- the CLI adapter ----------------------------------------------------------------------------------
def _dispatch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="udquant")
    add_dispatch_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_dispatch_hf_jobs_wait_prints_link_last(jobs: HubJobs, hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    argv = ["dispatch", "--backend", "hf-jobs", "someone/Distill-8B", "--quant", "UD-Q5_K_XL", "--flavor", "h200",
            "--wait", "--poll", "0.001"]
    args = _dispatch_parser().parse_args(argv)
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == f"{hub.url}/alice/Distill-8B-UD-GGUF"
    assert "completed" in err
    assert HF_TOKEN not in out + err
    (spec,) = jobs.created
    assert spec["flavor"] == "h200" and spec["secrets"] == {"HF_TOKEN": HF_TOKEN}


@pytest.mark.parametrize("wait", [False, True])
def test_cli_dispatch_docker_leaves_no_container_holding_the_token(
        wait: bool, jobs: HubJobs, engine: FakeDockerEngine, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Without --wait nobody reads the result and removes the container, so the engine removes it itself."""
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.chdir(tmp_path)
    args = _dispatch_parser().parse_args(["dispatch", "--backend", "docker", "someone/Distill-8B", "--poll", "0.05"]
                                         + (["--wait"] if wait else []))
    link = "https://huggingface.co/alice/Distill-8B-UD-GGUF"

    finished: list[str] = []

    def finish_when_running() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not finished:
            running = [cid for cid, c in list(engine.state.containers.items()) if c["State"]["Running"]]
            if running:
                engine.finish(running[0], 0, stdout=[link])
                finished.append(running[0])
            time.sleep(0.02)

    finisher = threading.Thread(target=finish_when_running)
    finisher.start()
    assert args.func(args) == 0
    finisher.join()
    create = next(body for _, path, body in engine.state.requests if path.startswith("/containers/create"))
    assert create is not None and create["HostConfig"].get("AutoRemove", False) is not wait
    # Unfollowed, a Space on this engine finds it; with --wait this command reads and removes it.
    assert ("org.udquant.user" in create["Labels"]) is not wait
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == (link if wait else finished[0])
    assert ("the container removes itself when the job ends" in err) is not wait
    assert engine.state.containers == {}  # removed by the engine (auto-remove), or once its result was read
    assert HF_TOKEN not in out + err


def test_cli_dispatch_refuses_what_the_job_would_refuse_before_anything_is_billed(
        jobs: HubJobs, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    hub.state.add_repo("alice/Distill-8B-UD-GGUF", {"README.md": b"# my own quants"})
    dispatch = ["dispatch", "--backend", "hf-jobs", "someone/Distill-8B"]
    args = _dispatch_parser().parse_args(dispatch)
    with pytest.raises(InputError, match="alice/Distill-8B-UD-GGUF already exists and was not made by udquant"):
        args.func(args)
    args = _dispatch_parser().parse_args([*dispatch, "--output-repo", "bob/Distill-8B-UD-GGUF"])
    with pytest.raises(InputError, match="cannot create or write bob/Distill-8B-UD-GGUF"):
        args.func(args)
    hub.state.read_only_tokens.add(HF_TOKEN)
    args = _dispatch_parser().parse_args([*dispatch, "--output-repo", "alice/Distill-8B-UD-GGUF"])
    with pytest.raises(InputError, match="read-only") as read_only:
        args.func(args)
    assert "--no-upload" not in str(read_only.value)  # a job option: dispatch has none
    assert jobs.created == []
    # Named, the repo is the user's choice: the job is told to publish there.
    hub.state.read_only_tokens.clear()
    assert args.func(args) == 0
    (spec,) = jobs.created
    assert spec["command"][-2:] == ["--output-repo", "alice/Distill-8B-UD-GGUF"]


class ScriptedBackend:
    """A backend whose status answers are given in advance: an answer, or an error to raise."""

    name = "scripted"

    def __init__(self, looks: list[JobStatus | DispatchError]) -> None:
        self.looks = looks
        self.released: list[JobHandle] = []

    def status(self, handle: JobHandle) -> JobStatus:
        look = self.looks.pop(0) if len(self.looks) > 1 else self.looks[0]
        if isinstance(look, DispatchError):
            raise look
        return look

    def logs(self, handle: JobHandle, tail: int = 50) -> list[str]:
        return ["INFO upload: done", "https://hub.example/alice/X-UD-GGUF"]

    def result_link(self, handle: JobHandle) -> str | None:
        return "https://hub.example/alice/X-UD-GGUF"

    def release(self, handle: JobHandle) -> None:
        self.released.append(handle)


def _wait_args(**changes: object) -> argparse.Namespace:
    return argparse.Namespace(**({"poll": 0.0, "wait_timeout": None, "tail": 5} | changes))


class UnreleasableBackend(ScriptedBackend):
    def release(self, handle: JobHandle) -> None:
        raise DispatchError("scripted", "remove: No such container", status_code=404)


def test_a_job_removed_elsewhere_after_its_end_still_gets_its_result_shown(
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    handle = JobHandle("scripted", "j1", "here", None)
    assert follow(UnreleasableBackend([JobStatus("completed")]), handle, _wait_args()) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "https://hub.example/alice/X-UD-GGUF"
    assert "cannot release scripted job j1 (removed elsewhere)" in caplog.text
    with pytest.raises(DispatchError, match="ended failed: exit code 1"):  # the job's end, not the release's
        follow(UnreleasableBackend([JobStatus("failed", "exit code 1")]), handle, _wait_args())


def test_wait_looks_again_after_passing_failures(capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    handle = JobHandle("scripted", "j1", "here", None)
    bad_gateway = DispatchError("scripted", "inspect_job failed: 502 Bad Gateway", status_code=502)
    no_answer = DispatchError("scripted", "inspect_job failed: connection reset")
    backend = ScriptedBackend([JobStatus("running"), bad_gateway, no_answer, bad_gateway,
                               JobStatus("running"), JobStatus("completed")])
    assert follow(backend, handle, _wait_args()) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "https://hub.example/alice/X-UD-GGUF"
    assert "looking again, 3 of 5" in caplog.text
    assert backend.released == [handle]


@pytest.mark.parametrize("failure", [
    DispatchError("scripted", "inspect_job failed: 401 Unauthorized", status_code=401),  # no use looking again
    DispatchError("scripted", "inspect_job failed: 503", status_code=503),  # still failing after five more looks
])
def test_wait_gives_up_on_lasting_failures(failure: DispatchError) -> None:
    backend = ScriptedBackend([JobStatus("running"), failure])
    with pytest.raises(DispatchError, match="inspect_job failed"):
        follow(backend, JobHandle("scripted", "j1", "here", None), _wait_args())
    assert backend.released == []


def test_wait_timeout_leaves_the_job_running() -> None:
    backend = ScriptedBackend([JobStatus("running")])
    handle = JobHandle("scripted", "j1", "here", None, url="https://jobs.example/j1")
    with pytest.raises(DispatchError, match="has not ended after --wait-timeout") as caught:
        follow(backend, handle, _wait_args(poll=0.01, wait_timeout=0.001))
    assert caught.value.hint == "https://jobs.example/j1"
    assert backend.released == []
    with pytest.raises(SystemExit):
        _dispatch_parser().parse_args(["dispatch", "--backend", "docker", "a/b", "--wait", "--wait-timeout", "0"])


@pytest.mark.parametrize(("given", "accepted"), [("8h", True), ("90m", True), ("1.5d", True), ("3600", True),
                                                ("8H", False), ("8 h", False), ("0h", False), ("-1", False),
                                                ("1.5", False)])
def test_hf_jobs_timeout_is_checked_before_anything_starts(given: str, accepted: bool,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["dispatch", "--backend", "hf-jobs", "a/b", "--timeout", given]
    if accepted:
        assert _dispatch_parser().parse_args(argv).timeout == given
        return
    with pytest.raises(SystemExit):
        _dispatch_parser().parse_args(argv)
    assert "is not a time limit such as 8h" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    *((["--poll", given], "is not a number of seconds (a finite number > 0)")
      for given in ("-1", "0", "nan", "inf", "x")),
    *((["--tail", given], "is not a number of lines (a whole number >= 1)") for given in ("0", "-5", "1.5")),
])
def test_poll_and_tail_are_checked_before_anything_starts(argv: list[str], message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        _dispatch_parser().parse_args(["dispatch", "--backend", "docker", "a/b", "--wait", *argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    args = _dispatch_parser().parse_args(["dispatch", "--backend", "docker", "a/b", "--poll", "0.5", "--tail", "1"])
    assert (args.poll, args.tail) == (0.5, 1)


@pytest.mark.parametrize(("argv", "message"), [
    (["--quant", "UD-Q9"], "unknown level 'UD-Q9'"),
    (["--recipe", "./my.yaml"], "recipe './my.yaml' is not in the library"),
    (["--recipe", "llama/UD-Q4_K_XL", "--quant", "UD-Q5_K_XL"], "makes UD-Q4_K_XL"),
    (["--image", "Not An Image"], "is not an image reference"),
])
def test_cli_dispatch_checks_all_input_before_asking_the_hub(argv: list[str], message: str, hub: HubServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A user mistake is reported as such, not hidden behind a whoami that fails (offline, no answer)."""
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = _dispatch_parser().parse_args(["dispatch", "--backend", "hf-jobs", "someone/Distill-8B", *argv])
    with pytest.raises(InputError, match=message):
        args.func(args)
    assert hub.state.requests == []


def test_a_failed_job_is_released_and_reported() -> None:
    backend = ScriptedBackend([JobStatus("failed", "exit code 5")])
    handle = JobHandle("scripted", "j1", "here", None)
    with pytest.raises(DispatchError, match="ended failed: exit code 5"):
        follow(backend, handle, _wait_args())
    assert backend.released == [handle]


def test_cli_needs_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    parser = _dispatch_parser()
    for argv in (["dispatch", "--backend", "hf-jobs", "a/b"], ["dispatch", "--backend", "github", "a/b",
                                                               "--github-repo", "me/runner"]):
        args = parser.parse_args(argv)
        with pytest.raises(InputError, match="in the environment"):
            args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["dispatch", "--backend", "hf-jobs", "a/b", "--token", "x"])


def test_cli_dispatch_github(github: FakeGitHub, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", GH_TOKEN)
    args = _dispatch_parser().parse_args(["dispatch", "--backend", "github", "someone/Distill-8B", "--github-repo",
                                          "me/runner", "--github-api", github.url, "--private"])
    assert args.func(args) == 0
    out, _ = capsys.readouterr()
    (run,) = github.state.runs.values()
    assert out.strip() == str(run.id)
    assert run.inputs["private"] == "true"


def test_eval_adds_time_and_disk_to_the_estimate() -> None:
    roomy = Hardware("x", "X", 8, 64e9, 500e9, "L40S", 1, 48e9, 0.03)
    level_bytes = [5_500_000_000]
    (plain,) = estimate_flavors([roomy], 8_000_000_000, level_bytes)
    cost = eval_cost(8_000_000_000, level_bytes, vocab_size=151_936)
    (measured,) = estimate_flavors([roomy], 8_000_000_000, level_bytes, cost)
    # 16 chunks x 255 scored tokens x 151,936 log-probabilities x 2 bytes, plus the standard quant
    assert cost.disk_bytes == pytest.approx(16 * 255 * 151_940 * 2 + 5_500_000_000, rel=1e-3)
    assert measured.minutes > plain.minutes and measured.cost_usd > plain.cost_usd
    squeezed = Hardware("y", "Y", 8, 64e9, 2 * 16e9 + 5.5e9 + 1e9, "L40S", 1, 48e9, 0.03)
    assert estimate_flavors([squeezed], 8_000_000_000, level_bytes)[0].fits
    assert not estimate_flavors([squeezed], 8_000_000_000, level_bytes, cost)[0].fits
