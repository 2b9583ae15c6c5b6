"""One look of the Space at a followed job (SpaceSession.poll), against a backend whose answers are scripted:
what the page shows, what is released, and which job the page follows next."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from tests.space_app import load_app_module
from udquant.dispatch.base import DispatchError, JobHandle, JobStatus
from udquant.errors import UdquantError

TOKEN = "hf_space-poll-token-not-real"
ENDED = JobHandle("docker", "c1", "host", "alice/X-UD-GGUF")
NEXT = JobHandle("docker", "c2", "host", "alice/Y-UD-GGUF")


@pytest.fixture(scope="module")
def app() -> ModuleType:
    return load_app_module()


class Scripted:
    """A backend that answers one status (or raises it), and runs `on_release` when the page releases a job."""

    name = "docker"

    def __init__(self, look: JobStatus | UdquantError, on_release: Callable[[], None] = lambda: None,
                 logs_fail: bool = False) -> None:
        self.look = look
        self.on_release = on_release
        self.logs_fail = logs_fail
        self.released: list[JobHandle] = []

    def status(self, handle: JobHandle) -> JobStatus:
        if isinstance(self.look, UdquantError):
            raise self.look
        return self.look

    def logs(self, handle: JobHandle, tail: int = 50) -> list[str]:
        if self.logs_fail:
            raise DispatchError("docker", "logs failed: connection reset")
        return ["INFO upload: done", "https://hub.example/alice/X-UD-GGUF"]

    def result_link(self, handle: JobHandle) -> str | None:
        return "https://hub.example/alice/X-UD-GGUF"

    def release(self, handle: JobHandle) -> None:
        self.released.append(handle)
        self.on_release()


def session_with(app: ModuleType, backend: Scripted) -> Any:
    class Session(app.SpaceSession):  # type: ignore[name-defined,misc]
        def user(self, token: str) -> str:
            return "alice"

        def backend(self, *args: Any, **kwargs: Any) -> Scripted:
            return backend

    session = Session(app.SpaceConfig())
    session.registry.adopt("alice", ENDED)
    return session


def test_an_ended_job_shows_its_link_is_released_and_frees_the_slot(app: ModuleType) -> None:
    backend = Scripted(JobStatus("completed"))
    session = session_with(app, backend)
    polled = session.poll(ENDED, TOKEN, "")
    assert "**completed**" in polled.status and polled.logs.endswith("alice/X-UD-GGUF")
    assert polled.link == "**Output repo:** [https://hub.example/alice/X-UD-GGUF](https://hub.example/alice/X-UD-GGUF)"
    assert backend.released == [ENDED]
    assert (polled.follow, polled.polling) == (None, False)
    assert session.registry.active("alice") is None


def test_a_job_started_while_the_last_look_ran_is_followed_next(app: ModuleType) -> None:
    """The user's next start can answer before the tick that saw the last job end: that tick must not drop it."""
    backend = Scripted(JobStatus("completed"))
    session = session_with(app, backend)
    backend.on_release = lambda: session.registry.submit("alice", lambda h: False, lambda: NEXT)
    polled = session.poll(ENDED, TOKEN, "")
    assert "**completed**" in polled.status  # the ended job's end is still shown once
    assert (polled.follow, polled.polling) == (NEXT, True)
    assert session.registry.active("alice") == NEXT


def test_a_job_gone_elsewhere_frees_the_slot_and_a_newer_one_is_followed(app: ModuleType) -> None:
    gone = DispatchError("docker", "containers.get: No such container: c1", status_code=404)
    session = session_with(app, Scripted(gone))
    polled = session.poll(ENDED, TOKEN, "")
    assert "it ended and was removed" in polled.status and (polled.logs, polled.link) == (None, None)
    assert (polled.follow, polled.polling) == (None, False)
    session.registry.adopt("alice", NEXT)
    assert session.poll(ENDED, TOKEN, "").follow == NEXT


def test_a_refused_token_keeps_the_job_but_stops_looking(app: ModuleType) -> None:
    refused = DispatchError("docker", "inspect failed: 403 Forbidden", status_code=403)
    polled = session_with(app, Scripted(refused)).poll(ENDED, TOKEN, "")
    assert "Polling stopped" in polled.status
    assert (polled.follow, polled.polling) == (ENDED, False)


def test_a_passing_failure_or_an_unreadable_log_keeps_looking(app: ModuleType) -> None:
    passing = DispatchError("docker", "inspect failed: 502 Bad Gateway", status_code=502)
    polled = session_with(app, Scripted(passing)).poll(ENDED, TOKEN, "")
    assert "502 Bad Gateway" in polled.status and (polled.follow, polled.polling) == (ENDED, True)
    polled = session_with(app, Scripted(JobStatus("running"), logs_fail=True)).poll(ENDED, TOKEN, "")
    assert "**running**" in polled.status and "log not readable now" in polled.status
    assert polled.logs is None  # the lines shown before stay
    assert (polled.follow, polled.polling, polled.link) == (ENDED, True, "")


def test_nothing_to_look_at_without_a_job_or_a_sign_in(app: ModuleType) -> None:
    session = session_with(app, Scripted(JobStatus("running")))
    assert session.poll(None, TOKEN, "") == app.Polled(follow=None, polling=False)
    assert session.poll(ENDED, None, "") == app.Polled(follow=ENDED, polling=False)
