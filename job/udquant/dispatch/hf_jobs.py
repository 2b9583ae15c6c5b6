"""Hugging Face Jobs: run this release's job image on rented hardware, billed to the user.

The user's token authenticates the API calls and reaches the job only as the secret
HF_TOKEN (encrypted by the Hub, never shown in the job's spec); it is never put into the
command or the plain environment.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import HfApi, JobHardwareInfo
from huggingface_hub.errors import HfHubHTTPError

from udquant import __version__
from udquant.dispatch.base import (
    DispatchError,
    DispatchRequest,
    JobHandle,
    JobStatus,
    State,
    link_from_logs,
    output_repo_for,
    redact,
)
from udquant.dispatch.estimate import JOB_TIME_LIMIT_HOURS, Hardware, image_cannot_run, parse_amount
from udquant.dispatch.job_command import JOB_ENV, JOB_PROGRAM, build_job_args
from udquant.errors import InputError, UdquantError
from udquant.hub import NO_ANSWER

logger = logging.getLogger(__name__)

NAME = "hf-jobs"
DEFAULT_FLAVOR = "a10g-large"
DEFAULT_TIMEOUT_HOURS = JOB_TIME_LIMIT_HOURS
DEFAULT_TIMEOUT = f"{DEFAULT_TIMEOUT_HOURS}h"
_STATES: dict[str, State] = {"SCHEDULING": "queued", "RUNNING": "running", "COMPLETED": "completed",
                             "ERROR": "failed", "CANCELED": "canceled", "DELETED": "canceled"}
_warned_stages: set[str] = set()  # stages this client does not know, each reported once per process
_NOT_IN_LABELS = re.compile(r"[^A-Za-z0-9_-]")


def hub_label(text: str) -> str:
    """A label key or value the Hub accepts (it answers 400 to any other character): letters, digits, '-' and
    '_' are kept, every other character becomes '-' (0.1.0 -> 0-1-0)."""
    return _NOT_IN_LABELS.sub("-", text)


JOB_LABELS = {"app": "udquant", "udquant-version": hub_label(__version__)}


class FlavorError(InputError):
    """A flavor HF Jobs does not offer, or whose GPU the job image cannot run on."""

    def __init__(self, flavor: str, reason: str, runnable: list[str]) -> None:
        super().__init__(f"{NAME}: flavor {flavor!r} {reason}; the GPU flavors that run the job image: "
                         f"{', '.join(runnable) or 'none offered now'}",
                         hint="choose one of those: nothing has been started or billed")
        self.flavor = flavor
        self.runnable = runnable


class HfJobsBackend:
    name = NAME

    def __init__(self, token: str, *, flavor: str = DEFAULT_FLAVOR, timeout: str = DEFAULT_TIMEOUT,
                 namespace: str | None = None, endpoint: str | None = None) -> None:
        if not token:
            raise DispatchError(NAME, "a Hugging Face token is needed", hint="sign in, or set HF_TOKEN")
        self._token = token
        self._api = HfApi(endpoint=endpoint, token=token)
        self.flavor = flavor
        self.timeout = timeout
        self._namespace = namespace

    @contextmanager
    def _calls(self, action: str) -> Iterator[None]:
        try:
            yield
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            raise DispatchError(NAME, f"{action} failed: {redact(str(err), [self._token])}",
                                status_code=status) from None
        except NO_ANSWER as err:  # no answer at all: refused, reset, timed out
            raise DispatchError(NAME, f"{action} failed: {redact(str(err), [self._token])}") from None

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            with self._calls("whoami"):
                self._namespace = str(self._api.whoami(cache=True)["name"])
        return self._namespace

    def check_flavor(self) -> None:
        """Refuse, before anything is billed, a flavor HF Jobs does not offer (the Hub would answer 400) or whose
        GPU the image cannot run on (ggml would abort after the start). CPU flavors pass, as the Hub offers them.
        When the hardware list cannot be read, the Hub decides on run_job."""
        try:
            offered = self._api.list_jobs_hardware()
        except (HfHubHTTPError, *NO_ANSWER) as err:
            logger.warning("cannot check the flavor %s against the HF Jobs hardware list (%s); starting anyway",
                           self.flavor, redact(str(err), [self._token]))
            return
        runnable = [info.name for info in sorted(offered, key=lambda info: info.unit_cost_usd)
                    if info.accelerator and image_cannot_run(info.accelerator.model) is None]
        found = next((info for info in offered if info.name == self.flavor), None)
        if found is None:
            raise FlavorError(self.flavor, "is not one HF Jobs offers", runnable)
        problem = image_cannot_run(found.accelerator.model) if found.accelerator else None
        if problem is not None:
            raise FlavorError(self.flavor, f"cannot run the job: {problem}", runnable)

    def start(self, request: DispatchRequest) -> JobHandle:
        self.check_flavor()
        command = build_job_args(request)
        logger.info("starting %s on HF Jobs (%s): %s", request.image, self.flavor, " ".join(command))
        with self._calls("run_job"):
            job = self._api.run_job(image=request.image, command=command, env=dict(JOB_ENV),
                                    secrets={"HF_TOKEN": self._token}, flavor=self.flavor, timeout=self.timeout,
                                    labels=dict(JOB_LABELS), namespace=self.namespace)
        return JobHandle(backend=NAME, job_id=job.id, location=self.namespace, output_repo=request.output_repo,
                         url=job.url)

    def status(self, handle: JobHandle) -> JobStatus:
        with self._calls("inspect_job"):
            job = self._api.inspect_job(job_id=handle.job_id, namespace=handle.location)
        stage = str(getattr(job.status.stage, "value", job.status.stage))
        message = redact(job.status.message or "", [self._token])
        if stage not in _STATES:  # a stage added to the Hub after this client: wait, and say which
            if stage not in _warned_stages:
                _warned_stages.add(stage)
                logger.warning("HF Jobs reports the stage %r, which udquant does not know; it is shown as waiting",
                               stage)
            return JobStatus("queued", f"stage {stage} (unknown to udquant){': ' + message if message else ''}")
        return JobStatus(_STATES[stage], message or stage.lower())

    def logs(self, handle: JobHandle, tail: int = 50) -> list[str]:
        """The last lines of the job's log. On a running job this takes about 5 s on the real Hub: the client
        reads until no line has come for 5 s (the server holds the stream open, with a keep-alive every 30 s),
        or until the first line logged after the request (about 1 s when the job writes often), and
        huggingface_hub 2.4 has no parameter to shorten that. An ended job's stream should close once replayed."""
        with self._calls("fetch_job_logs"):
            lines = list(self._api.fetch_job_logs(job_id=handle.job_id, namespace=handle.location, follow=False,
                                                  tail=tail))
        return [redact(line, [self._token]) for line in lines[-tail:]]

    def cancel(self, handle: JobHandle) -> None:
        with self._calls("cancel_job"):
            self._api.cancel_job(job_id=handle.job_id, namespace=handle.location)

    def result_link(self, handle: JobHandle) -> str | None:
        """The uploaded repo, once the job has completed (the job uploads to the repo it was given)."""
        if self.status(handle).state != "completed":
            return None
        if handle.output_repo is not None:
            return f"{self._api.endpoint}/{handle.output_repo}"
        return link_from_logs(self.logs(handle, tail=20))

    def release(self, handle: JobHandle) -> None:
        """Nothing to free: the service keeps an ended job's record and log itself."""

    def running_jobs(self) -> list[JobHandle]:
        """This user's udquant jobs that are scheduled or running, newest first: a front end that restarted, or
        a page opened again, follows them from here."""
        with self._calls("list_jobs"):
            jobs = list(self._api.list_jobs(status=["SCHEDULING", "RUNNING"], labels={"app": "udquant"},
                                            namespace=self.namespace))
        jobs.sort(key=lambda job: job.created_at.timestamp() if job.created_at else 0.0, reverse=True)
        return [JobHandle(backend=NAME, job_id=job.id, location=self.namespace,
                          output_repo=_output_repo(job.command or [], self.namespace), url=job.url) for job in jobs]

    def hardware(self) -> list[JobHardwareInfo]:
        with self._calls("list_jobs_hardware"):
            return self._api.list_jobs_hardware()


def _output_repo(command: list[str], namespace: str) -> str | None:
    """The repo a job started by build_job_args uploads to: --output-repo, else the default in its namespace."""
    if "--output-repo" in command[:-1]:
        return command[command.index("--output-repo") + 1]
    if len(command) > 1 and command[0] == JOB_PROGRAM:
        try:
            return output_repo_for(command[1], namespace)
        except UdquantError:
            return None
    return None


def list_hardware(token: str | None = None, endpoint: str | None = None) -> list[JobHardwareInfo]:
    """The flavors HF Jobs offers, with their prices, straight from the API."""
    try:
        return HfApi(endpoint=endpoint).list_jobs_hardware(token=token or False)
    except (HfHubHTTPError, *NO_ANSWER) as err:
        raise DispatchError(NAME, f"listing hardware failed: {redact(str(err), [token])}") from None


def describe_hardware(info: JobHardwareInfo) -> Hardware:
    """The hardware API's flavor as the estimator's plain dataclass (prices per minute)."""
    per_unit = float(info.unit_cost_usd)
    per_minute = per_unit / 60 if info.unit_label.lower().startswith("hour") else per_unit
    accelerator = info.accelerator
    return Hardware(
        name=info.name, pretty_name=info.pretty_name, cpus=int(parse_amount(info.cpu)),
        ram_bytes=parse_amount(info.ram, 1e9), disk_bytes=parse_amount(info.ephemeral_storage, 1e9),
        gpu_model=accelerator.model if accelerator else None,
        gpu_count=int(parse_amount(accelerator.quantity)) if accelerator else 0,
        vram_bytes=parse_amount(accelerator.vram, 1e9) if accelerator else 0.0,
        cost_usd_per_minute=per_minute)
