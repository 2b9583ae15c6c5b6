"""HF Jobs as the real Hub answers: labels it accepts, flavors it offers and the image runs on, stages it may add,
and log reads of a running job, against the fake Hub Jobs server (tests/fakes/hub_jobs.py)."""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from tests.fakes.hub_jobs import HubJobs
from tests.unit.conftest import HF_TOKEN
from udquant.cli import main
from udquant.dispatch.base import DispatchError, DispatchRequest
from udquant.dispatch.cli import add_dispatch_command
from udquant.dispatch.estimate import IMAGE_CUDA_ARCHITECTURES, estimate_flavors
from udquant.dispatch.hf_jobs import HfJobsBackend, describe_hardware, list_hardware
from udquant.errors import InputError

RUNNABLE = "a10g-large, l40sx1, h200"  # the fake's GPU flavors the image runs on, cheapest first
DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def _add_flavor(jobs: HubJobs, name: str, gpu_model: str) -> None:
    jobs.hardware.append({"name": name, "prettyName": f"Nvidia {gpu_model}", "cpu": "8 vCPU", "ram": "64 GB",
                          "ephemeralStorage": "500 GB", "accelerator": {"type": "gpu", "model": gpu_model,
                                                                        "quantity": "1", "vram": "80 GB",
                                                                        "manufacturer": "Nvidia"},
                          "unitCostMicroUSD": 40000, "unitCostUSD": 0.04, "unitLabel": "minute"})


# -- labels -------------------------------------------------------------------------------------------
def test_every_label_is_one_the_hub_accepts(jobs: HubJobs, job_request: DispatchRequest) -> None:
    backend = HfJobsBackend(HF_TOKEN)
    handle = backend.start(job_request)
    (spec,) = jobs.created
    assert spec["labels"]["app"] == "udquant" and spec["labels"]["udquant-version"] == "0-1-0"
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", text) for label in spec["labels"].items() for text in label)
    assert backend.running_jobs() == [handle]  # found again by its label


def test_the_fake_hub_refuses_labels_as_the_hub_does(jobs: HubJobs) -> None:
    with pytest.raises(HfHubHTTPError, match="allow only alphanumerics") as refused:
        HfApi(token=HF_TOKEN).run_job(image="ghcr.io/udquant/udquant-job:0.1.0", command=["true"],
                                      flavor="a10g-large", labels={"version": "0.1.0"}, namespace="alice")
    assert refused.value.response is not None and refused.value.response.status_code == 400
    assert jobs.created == []


# -- flavors: offered, and with a GPU the image runs on -------------------------------------------------
def test_estimates_offer_only_gpus_the_image_runs_on(jobs: HubJobs, caplog: pytest.LogCaptureFixture) -> None:
    _add_flavor(jobs, "b300x1", "B300")  # Blackwell: runs the PTX kept for 90
    _add_flavor(jobs, "z9x1", "Z9")  # a GPU model udquant does not know: assumed newer, with a warning
    _add_flavor(jobs, "v100x1", "V100")  # compute capability 7.0: like the T4, no kernels for it
    hardware = [describe_hardware(info) for info in list_hardware(HF_TOKEN)]
    estimates = estimate_flavors(hardware, 8_000_000_000, [5_500_000_000])
    assert not {"t4-small", "v100x1"} & {e.hardware.name for e in estimates}
    assert {"a10g-large", "l40sx1", "h200", "b300x1", "z9x1"} <= {e.hardware.name for e in estimates}
    assert "the GPU model 'Z9' is not in udquant's table of compute capabilities" in caplog.text


@pytest.mark.parametrize(("flavor", "reason"), [
    ("t4-small", "its GPU, T4, has compute capability 7.5, and the job image is built for CUDA architectures "
                 "80, 86, 89 and 90 only"),
])
def test_a_flavor_whose_gpu_the_image_cannot_run_is_refused_before_the_start(
        flavor: str, reason: str, jobs: HubJobs, job_request: DispatchRequest) -> None:
    with pytest.raises(InputError) as refused:
        HfJobsBackend(HF_TOKEN, flavor=flavor).start(job_request)
    assert reason in str(refused.value)
    assert f"the GPU flavors that run the job image: {RUNNABLE}" in str(refused.value)
    assert refused.value.exit_code == 2
    assert jobs.created == []


def test_the_cli_refuses_a_t4_with_exit_code_2(jobs: HubJobs, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    assert main(["dispatch", "--backend", "hf-jobs", "someone/Distill-8B", "--flavor", "t4-small"]) == 2
    assert "flavor 't4-small' cannot run the job: its GPU, T4, has compute capability 7.5" in capsys.readouterr().err
    assert jobs.created == []


def test_a_cpu_flavor_is_passed_on_as_before(jobs: HubJobs, job_request: DispatchRequest) -> None:
    HfJobsBackend(HF_TOKEN, flavor="cpu-basic").start(job_request)
    assert [spec["flavor"] for spec in jobs.created] == ["cpu-basic"]


def test_the_image_architectures_are_the_dockerfiles() -> None:
    (built,) = re.findall(r'^ARG CUDA_ARCHITECTURES="([^"]+)"$', DOCKERFILE.read_text(), re.MULTILINE)
    assert built == IMAGE_CUDA_ARCHITECTURES


def test_a_flavor_hf_jobs_does_not_offer_is_refused(jobs: HubJobs, job_request: DispatchRequest) -> None:
    with pytest.raises(InputError, match=f"flavor 'a10g-huge' is not one HF Jobs offers; the GPU flavors that "
                                         f"run the job image: {RUNNABLE}"):
        HfJobsBackend(HF_TOKEN, flavor="a10g-huge").start(job_request)
    assert jobs.created == []


def test_without_the_hardware_list_the_hub_decides(jobs: HubJobs, job_request: DispatchRequest,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    jobs.drop_hardware_requests = True  # the list gets no answer; run_job does
    with pytest.raises(DispatchError, match="Invalid flavor 'a10g-huge'") as refused:
        HfJobsBackend(HF_TOKEN, flavor="a10g-huge").start(job_request)
    assert refused.value.status_code == 400
    assert "cannot check the flavor a10g-huge against the HF Jobs hardware list" in caplog.text
    HfJobsBackend(HF_TOKEN, flavor="l40sx1").start(job_request)
    assert [spec["flavor"] for spec in jobs.created] == ["l40sx1"]


# -- the job's spec, status and log -----------------------------------------------------------------------
def test_the_job_environment_has_only_settings_the_job_reads(jobs: HubJobs, job_request: DispatchRequest) -> None:
    HfJobsBackend(HF_TOKEN).start(job_request)
    (spec,) = jobs.created
    assert spec["environment"] == {"UDQUANT_NO_PROGRESS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_an_unknown_stage_is_waiting_and_reported_once(jobs: HubJobs, job_request: DispatchRequest,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    jobs.progression = ["SCHEDULING", "PAUSED_FOR_TEST", "PAUSED_FOR_TEST", "COMPLETED"]
    backend = HfJobsBackend(HF_TOKEN)
    handle = backend.start(job_request)
    with caplog.at_level(logging.WARNING):
        looks = [backend.status(handle) for _ in range(3)]
    assert [look.state for look in looks] == ["queued", "queued", "completed"]
    assert looks[0].detail == "stage PAUSED_FOR_TEST (unknown to udquant)"
    assert [record.getMessage() for record in caplog.records if "PAUSED_FOR_TEST" in record.getMessage()] == [
        "HF Jobs reports the stage 'PAUSED_FOR_TEST', which udquant does not know; it is shown as waiting"]


def test_a_running_jobs_log_is_read_without_following_it(jobs: HubJobs, job_request: DispatchRequest) -> None:
    """The Hub holds a running job's log stream open; logs() returns what was there when the stream ends."""
    jobs.progression = ["SCHEDULING", *["RUNNING"] * 10]
    backend = HfJobsBackend(HF_TOKEN)
    handle = backend.start(job_request)
    assert backend.status(handle).state == "running"
    started = time.monotonic()
    assert backend.logs(handle) == ["INFO resolve: started (someone/Distill-8B)"]
    assert jobs.log_hold_s <= time.monotonic() - started < jobs.log_hold_s + 3
    backend.cancel(handle)
    started = time.monotonic()
    assert backend.logs(handle) == ["INFO resolve: started (someone/Distill-8B)"]
    assert time.monotonic() - started < jobs.log_hold_s  # an ended job's stream is not held


@pytest.mark.parametrize(("given", "accepted"), [("0.5s", False), ("0.01m", False), ("0s", False), ("1s", True),
                                                ("0.02m", True), ("1", True)])
def test_hf_jobs_time_limit_is_at_least_one_second(given: str, accepted: bool,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="udquant")
    add_dispatch_command(parser.add_subparsers(dest="command", required=True))
    argv = ["dispatch", "--backend", "hf-jobs", "a/b", "--timeout", given]
    if accepted:
        assert parser.parse_args(argv).timeout == given
        return
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert "the shortest is 1 second" in capsys.readouterr().err
