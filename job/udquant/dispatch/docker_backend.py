"""Local Docker: run the job image on this machine's GPUs through the Docker Engine API.

The token travels in the container's environment (HF_TOKEN). Plain containers have no
secret store: Docker secrets exist only for swarm services, and a file mount would leave
the token on the host's disk. The environment is visible to whoever can already control
the Docker engine (and thereby the host), and never appears in the command line, the
labels or our logs. The engine stores it with the container, so no container outlives its
job: a followed one is removed once its result is read (a failed one's log saved to a file
first), one nobody follows is started with auto-remove, and one that could not start is
removed at once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import requests.exceptions
from huggingface_hub import constants

from udquant import __version__
from udquant.dispatch.base import DispatchError, DispatchRequest, JobHandle, JobStatus, link_from_logs, redact
from udquant.dispatch.job_command import build_job_args

logger = logging.getLogger(__name__)

NAME = "docker"
# The image keeps the HF cache, the work dir and the results under /data (HF_HOME=/data/hf); a new
# named volume starts as a copy of the image's /data, owned by the job's user. The README and
# quantize.yml mount the same volume, so every way of running shares downloads and resumable work.
DATA_VOLUME = "udquant-data"
DATA_PATH = "/data"
LABEL_PREFIX = "org.udquant"
JOB_ENV = {"UDQUANT_NO_PROGRESS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
# Where a failed job's container log is saved (next to the job's own default output, ./udquant-out).
FAILED_LOG_DIR = Path("udquant-out") / "docker-logs"


def gpu_request() -> docker.types.DeviceRequest:
    """All GPUs, as `docker run --gpus all` asks for them."""
    return docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])


def connect(timeout: float = 10) -> docker.DockerClient:
    """A client for the engine named by DOCKER_HOST (default: the local socket)."""
    try:
        return docker.from_env(timeout=int(timeout))
    except docker.errors.DockerException as err:
        raise DispatchError(NAME, f"no Docker engine answers: {err}",
                            hint="start Docker, or set DOCKER_HOST to the engine's socket") from None


def engine_available(timeout: float = 2) -> bool:
    """Whether a Docker engine answers here: the Space offers local Docker only then."""
    try:
        client = docker.from_env(timeout=int(max(timeout, 1)))
        return bool(client.ping())
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return False


class DockerBackend:
    name = NAME

    def __init__(self, token: str, *, client: docker.DockerClient | None = None,
                 failed_log_dir: Path = FAILED_LOG_DIR, followed: bool = True) -> None:
        """followed=False: nobody will read the result and release the container, so the engine removes it
        when the job ends (its log goes with it; each stage's log stays in the volume)."""
        if not token:
            raise DispatchError(NAME, "a Hugging Face token is needed to upload the result", hint="set HF_TOKEN")
        self._token = token
        self._client = client or connect()
        self.failed_log_dir = failed_log_dir
        self.followed = followed

    @contextmanager
    def _calls(self, action: str) -> Iterator[None]:
        try:
            yield
        except docker.errors.NotFound as err:
            raise DispatchError(NAME, f"{action}: {redact(str(err.explanation or err), [self._token])}",
                                status_code=404) from None
        except docker.errors.APIError as err:
            raise DispatchError(NAME, f"{action} failed: {redact(str(err.explanation or err), [self._token])}",
                                status_code=err.status_code) from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
            raise DispatchError(NAME, f"{action} failed: {redact(str(err), [self._token])}") from None

    def container_spec(self, request: DispatchRequest) -> dict[str, Any]:
        """Keyword arguments of containers.run: everything the engine is told, in one place."""
        program, *arguments = build_job_args(request)
        return {
            "image": request.image,
            "entrypoint": [program],
            "command": arguments,
            "detach": True,
            "name": f"udquant-{uuid.uuid4().hex[:12]}",
            "device_requests": [gpu_request()],
            "init": True,  # an init as PID 1 forwards docker stop's SIGTERM and reaps the tools' processes
            "auto_remove": not self.followed,
            "volumes": {DATA_VOLUME: {"bind": DATA_PATH, "mode": "rw"}},
            "environment": {**JOB_ENV, "HF_TOKEN": self._token},
            "labels": {f"{LABEL_PREFIX}.job": "udquant-job", f"{LABEL_PREFIX}.version": __version__,
                       f"{LABEL_PREFIX}.repo": request.repo_id, f"{LABEL_PREFIX}.output-repo": request.output_repo},
        }

    def start(self, request: DispatchRequest) -> JobHandle:
        spec = self.container_spec(request)
        logger.info("starting %s in local Docker: %s", request.image, " ".join(spec["entrypoint"] + spec["command"]))
        try:
            with self._calls("containers.run"):
                container = self._client.containers.run(**spec)
        except DispatchError:
            self._remove_unstarted(spec["name"])
            raise
        return JobHandle(backend=NAME, job_id=str(container.id), location=str(self._client.api.base_url),
                         output_repo=request.output_repo, url=None)

    def _remove_unstarted(self, name: str) -> None:
        """containers.run creates, then starts: a start that failed (no NVIDIA runtime, say) leaves a created
        container holding the token."""
        # Nothing to remove when it was never created, or when the engine is gone.
        with suppress(docker.errors.DockerException, requests.exceptions.RequestException):
            self._client.containers.get(name).remove(force=True)

    def _container(self, handle: JobHandle) -> Any:
        with self._calls("containers.get"):
            return self._client.containers.get(handle.job_id)

    def status(self, handle: JobHandle) -> JobStatus:
        state = self._container(handle).attrs.get("State") or {}
        status = str(state.get("Status", "unknown"))
        if status in ("created", "restarting"):
            return JobStatus("queued", status)
        if status in ("running", "paused"):
            return JobStatus("running", status)
        code = int(state.get("ExitCode", -1))
        if state.get("OOMKilled"):
            return JobStatus("failed", f"killed for lack of memory (OOMKilled), exit code {code}")
        if code == 0:
            return JobStatus("completed", "exited 0")
        if code in (130, 137, 143) and status == "exited":  # stopped by us (SIGTERM/SIGKILL) or interrupted
            return JobStatus("canceled", f"exited {code}")
        return JobStatus("failed", f"{status}, exit code {code}")

    def logs(self, handle: JobHandle, tail: int = 50) -> list[str]:
        container = self._container(handle)
        with self._calls("logs"):
            raw = container.logs(stdout=True, stderr=True, tail=tail)
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        return [redact(line, [self._token]) for line in text.splitlines()][-tail:]

    def cancel(self, handle: JobHandle) -> None:
        container = self._container(handle)
        with self._calls("stop"):
            container.stop(timeout=30)

    def result_link(self, handle: JobHandle) -> str | None:
        """The URL the job printed last (the uploaded repo), once it has completed."""
        if self.status(handle).state != "completed":
            return None
        return link_from_logs(self.logs(handle, tail=20)) or f"{constants.ENDPOINT}/{handle.output_repo}"

    def release(self, handle: JobHandle) -> None:
        """Remove an ended job's container once its result has been read; a failed one's log is saved first.

        The volume stays: it holds the cache, the resumable work and the results.
        """
        status = self.status(handle)
        if not status.terminal:
            raise DispatchError(NAME, f"container {handle.job_id[:12]} is still {status.state}; cancel it first")
        container = self._container(handle)
        if status.state == "failed":
            saved = self._save_log(container, handle)
            logger.info("the failed job's log is in %s (its container is removed: the engine stored HF_TOKEN "
                        "with it); the udquant-data volume keeps its work dir and each stage's log", saved)
        with self._calls("remove"):
            container.remove()

    def _save_log(self, container: Any, handle: JobHandle) -> Path:
        with self._calls("logs"):
            raw = container.logs(stdout=True, stderr=True)
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        self.failed_log_dir.mkdir(parents=True, exist_ok=True)
        path = self.failed_log_dir / f"udquant-job-{handle.job_id[:12]}.log"
        path.write_text(redact(text, [self._token]))
        return path
