"""The Docker engine as the user meets it: connecting (no engine, or no permission to use it), what its
error messages mean, and a pull's progress."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import docker
import docker.errors
import requests.exceptions

from udquant.dispatch.base import DispatchError
from udquant.progress import StageProgress

logger = logging.getLogger(__name__)

NAME = "docker"


# What the engine's own words mean for the user: (text in the engine's message, what to do).
_ENGINE_HINTS = (
    ("could not select device driver", "this Docker engine cannot give containers a GPU: install the NVIDIA "
     "Container Toolkit and restart Docker (https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/"
     "latest/install-guide.html); `docker run --rm --gpus all ubuntu nvidia-smi` checks it"),
    ("no space left on device", "free disk space where Docker keeps its images (`docker system df`)"),
    ("pull access denied", "check the image name (--image), and `docker login` to its registry if it is private"),
    ("requested access to the resource is denied", "`docker login` to the image's registry if it is private"),
    ("unauthorized", "`docker login` to the image's registry if the image is private"),
    ("manifest unknown", "check the image name and tag (--image)"),
)
PERMISSION_HINT = ("add your user to the docker group (`sudo usermod -aG docker $USER`, then log in again), or use "
                   "rootless Docker: DOCKER_HOST=unix://$XDG_RUNTIME_DIR/docker.sock")


def engine_hint(message: str) -> str | None:
    lowered = message.lower()
    return next((hint for text, hint in _ENGINE_HINTS if text in lowered), None)


def connect(timeout: float = 10) -> docker.DockerClient:
    """A client for the engine named by DOCKER_HOST (default: the local socket).

    The timeout bounds each request; a pull, which may be quiet for minutes while a layer is
    unpacked, is sent without one (the SDK's pull asks for none, whatever the client's).
    """
    try:
        return docker.from_env(timeout=int(timeout))
    except docker.errors.DockerException as err:
        raise unreachable_error(err) from None


def unreachable_error(err: BaseException) -> DispatchError:
    """Why no engine can be used: refused by the socket's permissions (it runs), or none answers."""
    host = os.environ.get("DOCKER_HOST") or "the default socket"
    if permission_denied(err):
        return DispatchError(NAME, f"no permission to use the Docker engine at {host}: {err}", hint=PERMISSION_HINT)
    return DispatchError(NAME, f"no Docker engine answers at {host}: {err}",
                         hint="start Docker, or set DOCKER_HOST to the engine's socket")


def permission_denied(err: BaseException) -> bool:
    # The SDK wraps the socket's PermissionError in requests' and its own errors, through arguments and chains.
    pending: list[object] = [err]
    seen: set[int] = set()
    while pending:
        cause = pending.pop()
        if not isinstance(cause, BaseException) or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, PermissionError):
            return True
        pending += [cause.__cause__, cause.__context__, *cause.args]
    return "permission denied" in str(err).lower()


def engine_available(timeout: float = 2) -> bool:
    """Whether a Docker engine answers here and may be used: the Space offers local Docker only then.
    Why not is logged once (a warning when the engine runs but refuses this user)."""
    try:
        client = docker.from_env(timeout=int(max(timeout, 1)))
        return bool(client.ping())
    except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
        reason = unreachable_error(err)
        _log_once(logging.WARNING if permission_denied(err) else logging.INFO,
                  f"local Docker is not available: {reason} ({reason.hint})")
        return False


@functools.cache
def _log_once(level: int, message: str) -> None:
    logger.log(level, message)


class PullProgress:
    """A pull's progress as the engine streams it: bytes of the layers being downloaded on the bar, and a log
    line for each layer that is done (every other change of a layer's status at debug level)."""

    def __init__(self, image: str, bar: StageProgress) -> None:
        self.image = image
        self._bar = bar
        self._layers: dict[str, str] = {}  # layer id -> its latest status
        self._downloads: dict[str, tuple[int, int]] = {}  # layer id -> (bytes done, bytes in all)

    def update(self, entry: dict[str, Any]) -> None:
        status, layer = str(entry.get("status", "")), entry.get("id")
        if not layer or status.startswith("Pulling from"):  # the image's own lines: digest, result
            logger.debug("%s: %s", self.image, status)
            return
        detail = entry.get("progressDetail") or {}
        if status == "Downloading" and detail.get("total"):
            self._downloads[layer] = (int(detail.get("current", 0)), int(detail["total"]))
            self._bar.step(sum(done for done, _ in self._downloads.values()),
                           sum(total for _, total in self._downloads.values()))
        self._bar.line(f"{layer}: {status}")
        if self._layers.get(layer) == status:
            return
        self._layers[layer] = status
        if status in ("Pull complete", "Already exists"):
            done = sum(state in ("Pull complete", "Already exists") for state in self._layers.values())
            logger.info("%s: layer %s %s (%d of %d)", self.image, layer, status.lower(), done, len(self._layers))
        else:
            logger.debug("%s: layer %s %s", self.image, layer, status.lower())
