"""The GitHub backend against what GitHub really answers: hints for 401/403/404, rate limits, 409 on
cancelling an ended run, job logs with timestamps and colour codes, and the fallback run finder of
servers that do not say which run a dispatch started. HTTP goes to the fake GitHub API on 127.0.0.1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from huggingface_hub import constants

from tests.fakes.github_api import FakeGitHub
from udquant.dispatch.base import DispatchError, JobHandle, make_request
from udquant.dispatch.github import GitHubBackend, web_url

GH_TOKEN = "ghp_GitHubBackendSecret0123456789abcdef"
READ_ONLY_TOKEN = "github_pat_ReadOnly0123456789abcdef"
REPO_ID = "someone/Distill-8B"


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with FakeGitHub() as fake:
        fake.state.tokens.add(GH_TOKEN)
        yield fake


@pytest.fixture
def backend(github: FakeGitHub) -> Iterator[GitHubBackend]:
    backend = GitHubBackend(GH_TOKEN, "me/runner", api_url=github.url, poll_interval=0.01, find_timeout=5)
    yield backend
    backend.close()


def _api_requests(github: FakeGitHub) -> list[tuple[str, str]]:
    return [(method, path) for method, path, _, _ in github.state.requests]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- where the user is sent to look ----------------------------------------------------------------------------
@pytest.mark.parametrize(("api_url", "web"), [
    ("https://api.github.com", "https://github.com"),
    ("https://api.github.com/", "https://github.com"),
    ("https://ghe.example.com/api/v3", "https://ghe.example.com"),
    ("https://ghe.example.com/api/v3/", "https://ghe.example.com"),
    ("https://api.acme.ghe.com", "https://acme.ghe.com"),
])
def test_web_url_of_an_api_url(api_url: str, web: str) -> None:
    assert web_url(api_url) == web


def test_fallback_hint_points_at_the_servers_own_pages(github: FakeGitHub) -> None:
    """The fallback runs only on Enterprise Server, so its hint must not name github.com."""
    github.state.run_details, github.state.run_delay = "ignored", 10**6
    backend = GitHubBackend(GH_TOKEN, "me/runner", api_url=f"{github.url}/api/v3", find_timeout=0.05,
                            poll_interval=0.01)
    with pytest.raises(DispatchError, match="no new run") as caught:
        backend.start(make_request(REPO_ID, None))
    assert caught.value.hint == f"look at {github.url}/me/runner/actions/workflows/quantize.yml"
    assert all(path.startswith("/api/v3/") for _, path in _api_requests(github))


# -- refusals: 401, 403, 404 and rate limits -------------------------------------------------------------------
def test_404_on_listing_or_dispatching_explains_what_github_hides(github: FakeGitHub,
                                                                  backend: GitHubBackend) -> None:
    github.state.repositories = {"me/other"}  # a private repository outside the token's access answers 404
    with pytest.raises(DispatchError) as caught:
        backend.start(make_request(REPO_ID, None))
    assert caught.value.status_code == 404
    hint = caught.value.hint or ""
    assert "cannot see me/runner" in hint and "Actions: read and write" in hint and "repo scope" in hint
    assert ".github/workflows/quantize.yml is not on the default branch" in hint
    github.state.repositories, github.state.workflows = None, {"other.yml"}  # the workflow file is not there
    with pytest.raises(DispatchError) as caught:
        backend.start(make_request(REPO_ID, None))
    assert caught.value.status_code == 404 and "quantize.yml is not on the default branch" in str(caught.value.hint)
    assert not github.state.runs


def test_a_workflow_on_the_ref_without_this_releases_inputs_is_named(github: FakeGitHub,
                                                                     backend: GitHubBackend) -> None:
    github.state.declared_inputs = {"repo", "levels", "recipe", "imatrix", "private", "image-tag"}  # no eval yet
    with pytest.raises(DispatchError, match="answered 422: .*Unexpected inputs provided") as caught:
        backend.start(make_request(REPO_ID, None))
    assert caught.value.status_code == 422
    assert "quantize.yml on main must have the workflow_dispatch trigger and the inputs" in str(caught.value.hint)
    assert not github.state.runs


def test_404_of_a_run_is_not_blamed_on_the_token(github: FakeGitHub, backend: GitHubBackend) -> None:
    """A run deleted elsewhere answers 404 too; the Space then stops following it, and no hint misleads."""
    with pytest.raises(DispatchError) as caught:
        backend.status(JobHandle("github", "999999", "me/runner", None))
    assert caught.value.status_code == 404 and caught.value.hint is None


def test_401_and_403_hints_name_both_kinds_of_token(github: FakeGitHub) -> None:
    github.state.read_only_tokens.add(READ_ONLY_TOKEN)
    with pytest.raises(DispatchError) as caught:
        GitHubBackend(READ_ONLY_TOKEN, "me/runner", api_url=github.url).start(make_request(REPO_ID, None))
    assert caught.value.status_code == 403  # x-ratelimit-remaining is not 0: a permission, not a rate limit
    hint = str(caught.value.hint)
    assert "Actions: read and write on me/runner" in hint and "repo scope" in hint
    assert READ_ONLY_TOKEN not in str(caught.value) + hint
    with pytest.raises(DispatchError) as caught:
        GitHubBackend("ghp_wrong", "me/runner", api_url=github.url).start(make_request(REPO_ID, None))
    assert caught.value.status_code == 401 and "repo scope" in str(caught.value.hint)


def test_primary_rate_limit_is_temporary_and_says_when_it_resets(github: FakeGitHub,
                                                                 backend: GitHubBackend) -> None:
    handle = backend.start(make_request(REPO_ID, None))
    github.state.rate_limit = "primary"  # 403 with x-ratelimit-remaining: 0
    github.state.rate_limit_reset = int(time.time()) + 1800
    with pytest.raises(DispatchError) as caught:
        backend.status(handle)
    assert caught.value.status_code == 429  # what callers retry (dispatch --wait: cli._passing)
    reset = datetime.fromtimestamp(github.state.rate_limit_reset, UTC)
    assert "rate limit" in str(caught.value) and f"resets at {reset:%H:%M:%S} UTC (in 30 min)" in str(caught.value)
    assert GH_TOKEN not in str(caught.value)


def test_secondary_rate_limit_says_how_long_to_wait(github: FakeGitHub, backend: GitHubBackend) -> None:
    github.state.rate_limit = "secondary"  # 429 with retry-after
    with pytest.raises(DispatchError) as caught:
        backend.start(make_request(REPO_ID, None))
    assert caught.value.status_code == 429
    assert "rate limit" in str(caught.value) and "try again in 60 s" in str(caught.value)


# -- following a run ---------------------------------------------------------------------------------------------
def test_a_poll_of_a_running_job_costs_one_request_and_shows_its_steps(github: FakeGitHub,
                                                                        backend: GitHubBackend) -> None:
    handle = backend.start(make_request(REPO_ID, None))
    assert backend.status(handle).state == "running"
    github.state.requests.clear()
    lines = backend.logs(handle)
    assert _api_requests(github) == [("GET", f"/repos/me/runner/actions/runs/{handle.job_id}/jobs")]
    assert "its log appears when it has finished" in lines[0]
    assert lines[1:] == ["  Set up job: success", "  Run actions/checkout@v6: success",
                         "  Check the inputs: success", "  Run the job: in_progress"]
    github.state.finish(int(handle.job_id), "success", ["done"])
    github.state.requests.clear()
    assert backend.logs(handle) == ["done"]  # the job's log once it has finished: no timestamps
    job_id = github.state.runs[int(handle.job_id)].job_id
    assert ("GET", f"/repos/me/runner/actions/jobs/{job_id}/logs") in _api_requests(github)


def test_result_link_reads_logs_with_timestamps_and_colour_codes(github: FakeGitHub,
                                                                  backend: GitHubBackend) -> None:
    handle = backend.start(make_request(REPO_ID, None))
    github.state.finish(int(handle.job_id), "success", [
        "\x1b[36;1mRun the job\x1b[0m", "INFO upload: https://huggingface.co/me/Distill-8B-UD-GGUF/tree/main done",
        "\x1b[32mhttps://huggingface.co/me/Distill-8B-UD-GGUF\x1b[0m", "Post job cleanup."])
    assert backend.result_link(handle) == "https://huggingface.co/me/Distill-8B-UD-GGUF"
    lines = backend.logs(handle)
    assert lines == ["Run the job", "INFO upload: https://huggingface.co/me/Distill-8B-UD-GGUF/tree/main done",
                     "https://huggingface.co/me/Distill-8B-UD-GGUF", "Post job cleanup."]


def test_result_link_is_none_without_a_link_not_the_run_page(github: FakeGitHub, backend: GitHubBackend) -> None:
    handle = backend.start(make_request(REPO_ID, None))
    assert handle.url  # the run's page: shown as the job page, never as the output repo
    github.state.finish(int(handle.job_id), "success", ["the job printed no link", f"see {handle.url}"])
    assert backend.result_link(handle) is None


def test_result_link_prefers_a_known_output_repo(github: FakeGitHub, backend: GitHubBackend) -> None:
    started = backend.start(make_request(REPO_ID, None))
    handle = JobHandle("github", started.job_id, started.location, "me/Known-UD-GGUF", started.url)
    github.state.finish(int(handle.job_id), "success", ["https://huggingface.co/me/Other-UD-GGUF"])
    github.state.requests.clear()
    assert backend.result_link(handle) == f"{constants.ENDPOINT}/me/Known-UD-GGUF"
    assert not [path for _, path in _api_requests(github) if "/logs" in path or path.endswith("/jobs")]


def test_cancelling_an_ended_run_is_no_error(github: FakeGitHub, backend: GitHubBackend,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    handle = backend.start(make_request(REPO_ID, None))
    github.state.finish(int(handle.job_id), "success", ["https://huggingface.co/me/Distill-8B-UD-GGUF"])
    backend.cancel(handle)  # GitHub answers 409 Conflict: the run stays as it ended
    assert ("POST", f"/repos/me/runner/actions/runs/{handle.job_id}/cancel") in _api_requests(github)
    assert f"run {handle.job_id} has already ended" in caplog.text
    assert backend.status(handle).state == "completed"


def test_a_409_for_a_run_that_has_not_ended_is_raised(github: FakeGitHub, backend: GitHubBackend) -> None:
    handle = backend.start(make_request(REPO_ID, None))
    github.state.stuck.add(int(handle.job_id))
    with pytest.raises(DispatchError, match="not been queued yet") as caught:
        backend.cancel(handle)
    assert caught.value.status_code == 409


# -- the fallback run finder (servers without return_run_details) ------------------------------------------------
def _ago(seconds: float) -> str:
    return _iso(datetime.now(UTC) - timedelta(seconds=seconds))


@pytest.mark.parametrize(("other", "why"), [
    ({"inputs": {"repo": "someone/Other-8B"}, "created_at": _ago(1)}, "another model"),
    ({"inputs": {"repo": REPO_ID}, "ref": "dev", "created_at": _ago(1)}, "another branch"),
    ({"inputs": {"repo": REPO_ID}, "created_at": _ago(600)}, "created before the dispatch"),
])
def test_fallback_skips_a_new_run_another_dispatch_started(github: FakeGitHub, backend: GitHubBackend,
                                                           other: dict, why: str) -> None:
    github.state.run_details = "ignored"
    # Listed only after the look before the dispatch (GitHub's listing lags), and older than ours.
    intruder = github.state.add_run("me/runner", visible_after=1, **other)
    handle = backend.start(make_request(REPO_ID, None))
    assert handle.job_id != str(intruder.id), why
    ours = github.state.runs[int(handle.job_id)]
    assert ours.inputs["repo"] == REPO_ID and ours.ref == "main"


def test_fake_lists_runs_with_their_title_like_github(github: FakeGitHub, backend: GitHubBackend) -> None:
    handle = backend.start(make_request(REPO_ID, None))
    run = github.state.runs[int(handle.job_id)].payload(github.url)
    assert run["display_title"] == f"quantize {REPO_ID}" and run["head_branch"] == "main"
