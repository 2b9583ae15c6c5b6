"""One look of the Space at a followed job (SpaceSession.poll) through the real backends: local Docker on the fake
engine, HF Jobs and whoami on the local Hub. What the page shows, what is released, and which job it follows next."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import pytest

from tests.fakes.docker_engine import FakeDockerEngine
from tests.fakes.github_api import FakeGitHub
from tests.fakes.hub_jobs import HubJobs
from tests.space_app import load_app_module
from tests.unit.conftest import HF_TOKEN
from udquant.dispatch.base import DispatchRequest, JobHandle, make_request

LINK = "https://huggingface.co/alice/Distill-8B-UD-GGUF"


@pytest.fixture(scope="module")
def app() -> ModuleType:
    return load_app_module()


@pytest.fixture
def session(app: ModuleType, engine: FakeDockerEngine, jobs: HubJobs, job_request: DispatchRequest) -> Any:
    engine.state.images.add(job_request.image)
    return app.SpaceSession(app.SpaceConfig(docker=True))


@pytest.fixture
def start(app: ModuleType, session: Any, job_request: DispatchRequest) -> Callable[[], JobHandle]:
    """Start a Docker job for alice as the Space does: her slot is free once her last job has ended."""
    def started() -> JobHandle:
        backend = session.backend(app.TARGET_DOCKER, HF_TOKEN, user="alice")
        handle: JobHandle = session.registry.submit("alice", lambda h: not backend.status(h).terminal,
                                                    lambda: backend.start(job_request))
        return handle
    return started


def test_an_ended_job_shows_its_link_is_released_and_frees_the_slot(
        session: Any, start: Callable[[], JobHandle], engine: FakeDockerEngine) -> None:
    ended = start()
    engine.finish(ended.job_id, 0, stdout=["INFO upload: done", LINK])
    polled = session.poll(ended, HF_TOKEN, "")
    assert "**completed**" in polled.status and polled.logs.endswith(LINK)
    assert polled.link == f"**Output repo:** [{LINK}]({LINK})"
    assert ended.job_id not in engine.state.containers  # released: the engine kept the token with it
    assert (polled.follow, polled.polling) == (None, False)
    assert session.registry.active("alice") is None


def test_a_job_started_while_the_last_look_ran_is_followed_next(
        session: Any, start: Callable[[], JobHandle], engine: FakeDockerEngine) -> None:
    """The user's next start can answer before the tick that saw the last job end: that tick must not drop it."""
    ended = start()
    engine.finish(ended.job_id, 0, stdout=[LINK])
    following = start()  # the start saw the job ended, before the tick that saw it finished
    polled = session.poll(ended, HF_TOKEN, "")
    assert "**completed**" in polled.status and LINK in polled.link  # the ended job's end is still shown once
    assert (polled.follow, polled.polling) == (following, True)
    assert session.registry.active("alice") == following


def test_a_job_gone_elsewhere_frees_the_slot_and_a_newer_one_is_followed(
        session: Any, start: Callable[[], JobHandle], engine: FakeDockerEngine) -> None:
    gone = start()
    del engine.state.containers[gone.job_id]  # `docker rm -f` by someone else
    polled = session.poll(gone, HF_TOKEN, "")
    assert "it ended and was removed" in polled.status and (polled.logs, polled.link) == (None, None)
    assert (polled.follow, polled.polling) == (None, False)
    following = start()
    assert session.poll(gone, HF_TOKEN, "").follow == following


def test_a_refused_token_keeps_the_job_but_stops_looking(session: Any) -> None:
    handle = JobHandle("hf-jobs", "job-1", "alice", "alice/Distill-8B-UD-GGUF")
    polled = session.poll(handle, "hf_revoked-token", "")
    assert "Polling stopped" in polled.status and "hf_revoked-token" not in polled.status
    assert (polled.follow, polled.polling) == (handle, False)


def test_an_unreachable_engine_or_an_unreadable_log_keeps_looking(
        session: Any, start: Callable[[], JobHandle], engine: FakeDockerEngine) -> None:
    engine.state.log_driver = "none"  # the engine keeps no log of the job: it answers 501
    running = start()
    polled = session.poll(running, HF_TOKEN, "")
    assert "**running**" in polled.status and "log not readable now" in polled.status
    assert polled.logs is None  # the lines shown before stay
    assert (polled.follow, polled.polling, polled.link) == (running, True, "")
    engine.stop()  # the engine the Space's client talks to goes away (a restart of dockerd)
    polled = session.poll(running, HF_TOKEN, "")
    assert "no Docker engine answers" in polled.status and (polled.follow, polled.polling) == (running, True)


def test_every_look_shares_one_engine_client(session: Any, start: Callable[[], JobHandle],
                                             engine: FakeDockerEngine) -> None:
    """A new client first asks the engine its API version: once per Space, not once per look every 3 s."""
    running = start()
    for _ in range(3):
        assert "**running**" in session.poll(running, HF_TOKEN, "").status
    assert [path for _, path, _ in engine.state.requests].count("/version") == 1


def test_nothing_to_look_at_without_a_job_or_a_sign_in(app: ModuleType, session: Any) -> None:
    handle = JobHandle("docker", "c1", "host", None)
    assert session.poll(None, HF_TOKEN, "") == app.Polled(follow=None, polling=False)
    assert session.poll(handle, None, "") == app.Polled(follow=handle, polling=False)


GH_TOKEN = "ghp_SpaceRunnerToken0123456789abcdef"


@pytest.fixture
def github() -> Any:
    with FakeGitHub() as fake:
        fake.state.tokens.add(GH_TOKEN)
        yield fake


@pytest.fixture
def github_session(app: ModuleType, github: FakeGitHub, jobs: HubJobs) -> Any:
    return app.SpaceSession(app.SpaceConfig(github_api=github.url))


def start_github_run(app: ModuleType, session: Any) -> JobHandle:
    """alice's run on her own runner, started as the Space starts it (no namespace: her runner's token's)."""
    job_request = make_request("someone/Distill-8B", None)
    with app.opened(session.backend(app.TARGET_GITHUB, HF_TOKEN, github_repo="alice/runner",
                                    github_token=GH_TOKEN)) as backend:
        handle: JobHandle = session.registry.submit(
            "alice", lambda h: session.still_runs(h, HF_TOKEN, GH_TOKEN), lambda: backend.start(job_request))
    return handle


def test_a_github_run_the_page_cannot_see_never_holds_the_slot_for_good(
        app: ModuleType, github_session: Any, github: FakeGitHub) -> None:
    """After a reload the GitHub token box is empty, and a token may be revoked: the run goes on on the user's
    own runner, but the Space must still let them start another job."""
    run = start_github_run(app, github_session)
    assert github_session.still_runs(run, HF_TOKEN, GH_TOKEN)  # the page's token sees it running
    assert not github_session.still_runs(run, HF_TOKEN, "")  # no token entered since a reload
    github.state.tokens.clear()  # revoked
    assert not github_session.still_runs(run, HF_TOKEN, GH_TOKEN)
    polled = github_session.poll(run, HF_TOKEN, GH_TOKEN)
    assert "Not followed any more: see [its run page](" in polled.status and GH_TOKEN not in polled.status
    assert (polled.follow, polled.polling) == (None, False)
    assert github_session.registry.active("alice") is None


def test_an_hf_job_whose_state_cannot_be_read_keeps_the_slot(app: ModuleType, session: Any) -> None:
    """Unlike a GitHub run, it may run on, billed to the user: no second one is started beside it."""
    handle = JobHandle("hf-jobs", "job-1", "alice", "alice/Distill-8B-UD-GGUF")
    session.registry.adopt("alice", handle)
    with pytest.raises(app.DispatchError):
        session.still_runs(handle, "hf_revoked-token", "")
    polled = session.poll(handle, "hf_revoked-token", "")
    assert (polled.follow, polled.polling) == (handle, False) and session.registry.active("alice") == handle


def test_ended_docker_jobs_no_page_released_are_removed_hours_later_with_their_logs(
        app: ModuleType, session: Any, engine: FakeDockerEngine, job_request: DispatchRequest,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Users closed their pages and never came back: the engine must not keep their tokens for good."""
    monkeypatch.chdir(tmp_path)
    abandoned, recent, running = (session.backend(app.TARGET_DOCKER, HF_TOKEN, user=user).start(job_request)
                                  for user in ("alice", "bob", "carol"))
    engine.finish(abandoned.job_id, 5, stderr=[f"ERROR quantize: out of disk (token {HF_TOKEN} echoed)"])
    engine.finish(recent.job_id, 0, stdout=[LINK])
    seven_hours_ago = (datetime.now(UTC) - timedelta(hours=7)).isoformat().replace("+00:00", "Z")
    engine.state.containers[abandoned.job_id]["State"]["FinishedAt"] = seven_hours_ago
    assert session.sweep_abandoned() == [abandoned.job_id]
    assert set(engine.state.containers) == {recent.job_id, running.job_id}  # its page may still come back
    saved = (tmp_path / "udquant-out" / "docker-logs" / f"udquant-job-{abandoned.job_id[:12]}.log").read_text()
    assert "out of disk" in saved and HF_TOKEN not in saved  # redacted with the job's own token
    later = datetime.now(UTC) + timedelta(hours=7)
    assert session.sweep_abandoned(now=later) == [recent.job_id]
    assert set(engine.state.containers) == {running.job_id}
