"""Local Docker: run the job image on this machine's GPUs through the Docker Engine API.

The token travels in the container's environment (HF_TOKEN). Plain containers have no
secret store: Docker secrets exist only for swarm services, and a file mount would leave
the token on the host's disk. The environment is visible to whoever can already control
the Docker engine (and thereby the host), and never appears in the command line, the
labels or our logs. The engine stores it with the container, so no container outlives its
job: a followed one is removed once its result is read (the log of one that did not complete saved to a file
first), one nobody follows is started with auto-remove, and one that could not start is
removed at once. A front end that lost track of its jobs (restarted, page closed) finds a
user's by their labels: running_jobs() to follow them again, remove_ended() to remove the
ended ones; remove_abandoned() removes every user's ended ones that nobody released for long.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import docker.utils
import requests.exceptions
import urllib3.exceptions

from udquant import __version__
from udquant.dispatch.base import (
    DispatchError,
    DispatchRequest,
    JobHandle,
    JobStatus,
    known_result,
    link_from_logs,
    output_repo_for,
    redact,
)
from udquant.dispatch.docker_engine import (
    NAME,
    PullProgress,
    connect,
    engine_hint,
    permission_denied,
    unreachable_error,
)
from udquant.dispatch.job_command import JOB_ENV, build_job_args
from udquant.errors import UdquantError
from udquant.progress import stage_progress

logger = logging.getLogger(__name__)

# The image keeps the HF cache, the work dir and the results under /data (HF_HOME=/data/hf); a new
# named volume starts as a copy of the image's /data, owned by the job's user. The README and
# quantize.yml mount the same volume, so every way of running shares downloads and resumable work.
DATA_VOLUME = "udquant-data"
DATA_PATH = "/data"
LABEL_PREFIX = "org.udquant"
JOB_LABEL = f"{LABEL_PREFIX}.job=udquant-job"
USER_LABEL = f"{LABEL_PREFIX}.user"  # the Hub user the job is for: a front end finds that user's jobs by it
# Container states (docker ps --filter status=...): those of a job not ended yet, and of one that has.
ACTIVE_STATES = ("created", "restarting", "running", "paused")
ENDED_STATES = ("exited", "dead")
# The token of a backend that starts nothing: text that never appears in a log, so redacting it changes nothing.
NO_TOKEN = "\x00"
# Where a failed job's container log is saved (next to the job's own default output, ./udquant-out).
FAILED_LOG_DIR = Path("udquant-out") / "docker-logs"


def gpu_request() -> docker.types.DeviceRequest:
    """All GPUs, as `docker run --gpus all` asks for them."""
    return docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])


class DockerBackend:
    name = NAME

    def __init__(self, token: str, *, client: docker.DockerClient | None = None,
                 failed_log_dir: Path = FAILED_LOG_DIR, followed: bool = True, user: str | None = None) -> None:
        """followed=False: nobody will read the result and release the container, so the engine removes it
        when the job ends (its log goes with it; each stage's log stays in the volume).
        user: the Hub user the jobs are for, put in a label so that running_jobs and remove_ended find them."""
        if not token:
            raise DispatchError(NAME, "a Hugging Face token is needed to upload the result", hint="set HF_TOKEN")
        self._token = token
        self._client = client or connect()
        self.failed_log_dir = failed_log_dir
        self.followed = followed
        self.user = user

    @contextmanager
    def _calls(self, action: str) -> Iterator[None]:
        try:
            yield
        except docker.errors.NotFound as err:
            message = redact(str(err.explanation or err), [self._token])
            raise DispatchError(NAME, f"{action}: {message}", status_code=404, hint=engine_hint(message)) from None
        except docker.errors.APIError as err:
            message = redact(str(err.explanation or err), [self._token])
            raise DispatchError(NAME, f"{action} failed: {message}", status_code=err.status_code,
                                hint=engine_hint(message)) from None
        except requests.exceptions.ConnectionError as err:  # the engine stopped since the client was made
            raise unreachable_error(err) from None
        # urllib3's own: a stream (a pull) cut off midway is read from the raw response, past requests.
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError) as err:
            if permission_denied(err):
                raise unreachable_error(err) from None
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
            "labels": self._labels(request),
        }

    def _labels(self, request: DispatchRequest) -> dict[str, str]:
        labels = {f"{LABEL_PREFIX}.job": "udquant-job", f"{LABEL_PREFIX}.version": __version__,
                  f"{LABEL_PREFIX}.repo": request.repo_id}
        if request.output_repo is not None:
            labels[f"{LABEL_PREFIX}.output-repo"] = request.output_repo
        if self.user is not None:
            labels[USER_LABEL] = self.user
        return labels

    def start(self, request: DispatchRequest) -> JobHandle:
        spec = self.container_spec(request)
        self._ensure_image(request.image)
        logger.info("starting %s in local Docker: %s", request.image, " ".join(spec["entrypoint"] + spec["command"]))
        try:
            with self._calls("starting the job's container"):
                container = self._client.containers.run(**spec)
        except (DispatchError, KeyboardInterrupt):  # Ctrl-C between create and start leaves one too
            self._remove_unstarted(spec["name"])
            raise
        return self._handle(container, request.output_repo)

    def _handle(self, container: Any, output_repo: str | None) -> JobHandle:
        return JobHandle(backend=NAME, job_id=str(container.id), location=str(self._client.api.base_url),
                         output_repo=output_repo, url=None)

    def _ensure_image(self, image: str) -> None:
        """Pull the image unless it is here. Not left to containers.run: its pull discards the engine's
        progress and error entries, so a pull that failed (disk full, access denied) would show only as
        "No such image", and a multi-GB pull would show nothing for many minutes."""
        with self._calls("looking for the image"), suppress(docker.errors.ImageNotFound):
            self._client.images.get(image)
            return
        repository, tag = docker.utils.parse_repository_tag(image)
        logger.info("pulling %s (not on this machine yet)", image)
        with self._calls(f"pulling {image}"), stage_progress("pull") as bar:
            progress = PullProgress(image, bar)
            for entry in self._client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                failure = (entry.get("errorDetail") or {}).get("message") or entry.get("error")
                if failure:
                    message = redact(str(failure), [self._token])
                    raise DispatchError(NAME, f"pulling {image} failed: {message}", hint=engine_hint(message))
                progress.update(entry)
        logger.info("pulled %s", image)

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
        # The exit code first: OOMKilled is set when any process of the container was killed, also a child the
        # job survived (a tool it retried), and then the job exited 0.
        if code == 0:
            return JobStatus("completed", "exited 0")
        if state.get("OOMKilled"):
            return JobStatus("failed", f"killed for lack of memory (OOMKilled), exit code {code}")
        if code in (130, 137, 143) and status == "exited":  # stopped by us (SIGTERM/SIGKILL) or interrupted
            # Or killed from outside (docker kill, a daemon restart, the host's OOM killer, which cgroup v2 does not
            # always flag): the log is kept either way (release).
            return JobStatus("canceled", f"exited {code} (stopped or killed by a signal)")
        return JobStatus("failed", f"{status}, exit code {code}")

    def logs(self, handle: JobHandle, tail: int = 50) -> list[str]:
        container = self._container(handle)
        with self._calls("logs"):
            raw = container.logs(stdout=True, stderr=True, tail=tail)
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        return [redact(line, [self._token]) for line in text.splitlines()][-tail:]

    def cancel(self, handle: JobHandle) -> None:
        """Stop the job (SIGTERM, then SIGKILL after 30 s); one that has ended already is left as it is. A
        container that was created but never started is removed: stop leaves it, holding the token and a slot."""
        container = self._container(handle)
        if container.status == "created":
            with self._calls("remove"):
                container.remove(force=True)
            return
        with self._calls("stop"):
            container.stop(timeout=30)  # the engine answers 304 for a stopped container: no error

    def result_link(self, handle: JobHandle) -> str | None:
        """The URL the job printed last (the uploaded repo), once it has completed; the output repo's page when
        the log cannot be read (a log driver such as `none` keeps none)."""
        if self.status(handle).state != "completed":
            return None
        known = known_result(handle)
        try:
            lines = self.logs(handle, tail=20)
        except DispatchError as err:
            logger.warning("the job's log cannot be read (%s); its result is at %s", err, known or "its output repo")
            return known
        return link_from_logs(lines) or known

    def release(self, handle: JobHandle) -> None:
        """Remove an ended job's container once its result has been read; the log of one that did not complete is
        saved first (failed, or stopped: a SIGKILL from outside looks like a cancel).

        The volume stays: it holds the cache, the resumable work and the results.
        """
        status = self.status(handle)
        if not status.terminal:
            raise DispatchError(NAME, f"container {handle.job_id[:12]} is still {status.state}; cancel it first")
        container = self._container(handle)
        if status.state != "completed":
            try:
                saved = self._save_log(container, handle)
            except (DispatchError, OSError) as err:  # removed all the same: the token must not stay behind
                logger.warning("the %s job's log cannot be saved (%s); its container is removed all the same "
                               "(the engine stored HF_TOKEN with it); the udquant-data volume keeps its work dir and "
                               "each stage's log", status.state, err)
            else:
                logger.info("the %s job's log is in %s (its container is removed: the engine stored HF_TOKEN "
                            "with it); the udquant-data volume keeps its work dir and each stage's log",
                            status.state, saved)
        with self._calls("remove"):
            container.remove()

    def running_jobs(self, user: str) -> list[JobHandle]:
        """The user's udquant jobs that have not ended, newest first: a front end that restarted, or a page opened
        again, follows them from here (found by the label of DockerBackend(user=...))."""
        return [self._handle(container, self._output_repo(container, user))
                for container in self._user_containers(user, ACTIVE_STATES)]

    def remove_ended(self, user: str) -> list[str]:
        """Remove the user's ended udquant containers that nobody released (a page closed, a front end restarted),
        each as release() does: the log of one that did not complete saved first. Returns the removed ids."""
        removed = _release_all([(self, self._handle(container, self._output_repo(container, user)))
                                for container in self._user_containers(user, ENDED_STATES)])
        if removed:
            logger.info("removed %d ended udquant container(s) of %s: %s", len(removed), user,
                        ", ".join(cid[:12] for cid in removed))
        return removed

    @classmethod
    def remove_abandoned(cls, client: docker.DockerClient, *, ended_before: datetime,
                         failed_log_dir: Path = FAILED_LOG_DIR) -> list[str]:
        """Remove a front end's job containers, of any user, that ended before ended_before and that nobody
        released since (a page closed and never opened again): the engine keeps each one's HF_TOKEN. Each goes as
        release() does, its own token redacted from its saved log. Returns the ids of the removed containers."""
        lister = cls(NO_TOKEN, client=client)  # lists only
        with lister._calls("listing containers"):
            containers = client.containers.list(all=True, filters={"label": [JOB_LABEL, USER_LABEL],
                                                                    "status": list(ENDED_STATES)}, ignore_removed=True)
        abandoned = [container for container in containers
                     if _moment((container.attrs.get("State") or {}).get("FinishedAt")) < ended_before]
        removed = _release_all([(cls(_environment(container).get("HF_TOKEN") or NO_TOKEN, client=client,
                                     failed_log_dir=failed_log_dir), lister._handle(container, None))
                                for container in abandoned])
        if removed:
            logger.info("removed %d udquant container(s) that ended before %s and that nobody released: %s",
                        len(removed), ended_before.isoformat(timespec="seconds"),
                        ", ".join(cid[:12] for cid in removed))
        return removed

    def _user_containers(self, user: str, states: tuple[str, ...]) -> list[Any]:
        if not user:
            raise DispatchError(NAME, "no user given to look for jobs of")
        with self._calls("listing containers"):
            containers = self._client.containers.list(
                all=True, filters={"label": [JOB_LABEL, f"{USER_LABEL}={user}"], "status": list(states)},
                ignore_removed=True)
        return sorted(containers, key=_created, reverse=True)

    @staticmethod
    def _output_repo(container: Any, user: str) -> str | None:
        """The repo the job uploads to: its label, else the default for its source repo in the user's namespace
        (what the job chooses when it was not named)."""
        labels: dict[str, str] = container.labels or {}
        if labels.get(f"{LABEL_PREFIX}.output-repo"):
            return labels[f"{LABEL_PREFIX}.output-repo"]
        source = labels.get(f"{LABEL_PREFIX}.repo", "")
        try:
            return output_repo_for(source, user) if "/" in source else None
        except UdquantError:
            return None

    def _save_log(self, container: Any, handle: JobHandle) -> Path:
        with self._calls("logs"):
            raw = container.logs(stdout=True, stderr=True)
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        self.failed_log_dir.mkdir(parents=True, exist_ok=True)
        path = self.failed_log_dir / f"udquant-job-{handle.job_id[:12]}.log"
        path.write_text(redact(text, [self._token]))
        return path


def _release_all(jobs: list[tuple[DockerBackend, JobHandle]]) -> list[str]:
    """Release each ended job with its backend (the one that knows its token); the ids of those removed."""
    removed = []
    for backend, handle in jobs:
        try:
            backend.release(handle)
        except DispatchError as err:
            if err.status_code != 404:  # released meanwhile by whoever followed it, if 404
                logger.warning("cannot remove the ended container %s: %s", handle.job_id[:12], err)
            continue
        removed.append(handle.job_id)
    return removed


def _environment(container: Any) -> dict[str, str]:
    pairs = (container.attrs.get("Config") or {}).get("Env") or []
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def _created(container: Any) -> datetime:
    return _moment(container.attrs.get("Created"))


def _moment(text: object) -> datetime:
    """An engine time (RFC 3339 with up to nanoseconds, which Python reads up to micro); the epoch when missing or
    unreadable."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", str(text or ""))
    if match is None:
        return datetime.fromtimestamp(0).astimezone()
    fraction = (match[2] or ".0")[:7].ljust(7, "0")
    return datetime.fromisoformat(match[1] + fraction + ("+00:00" if match[3] == "Z" else match[3]))
