"""The Space, for real: space/app.py in its own process on 127.0.0.1 (test-token mode), driven in headless
Debian Chromium through Playwright, against the local Hub test server and its jobs endpoints.

Screenshots go to test-artifacts/space/. Needs `apt-get install -y chromium` (never `playwright install`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.docker_engine import FakeDockerEngine
from tests.fakes.github_api import FakeGitHub
from tests.fakes.hub_jobs import HubJobs
from tests.fakes.hub_models import add_distill
from tests.hubserver import HubServer
from tests.space_app import APP, load_app_module

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "space"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TEST_TOKEN = "hf_test-space-token-not-real"
GH_TOKEN = "ghp_SpaceTestToken0123456789abcdefgh"
REPO = "someone/Distill-8B"
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _app_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SPACE_ID", "SYSTEM", "HF_TOKEN")}
    return env | {"GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"} | extra


@pytest.fixture
def jobs(hub: HubServer, tmp_path: Path) -> Iterator[HubJobs]:
    fake = HubJobs(hub, users={TEST_TOKEN: "alice"}).install()
    add_distill(hub.state, REPO, base_model="meta-llama/Llama-3.1-8B", directory=tmp_path)
    yield fake
    fake.uninstall()


@pytest.fixture
def space(jobs: HubJobs, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The app in its own process, next to a (fake) Docker engine so local Docker is offered, and a fake GitHub."""
    port = _free_port()
    log = tmp_path / "space.log"
    with FakeDockerEngine() as engine, FakeGitHub() as github, log.open("w") as out:
        github.state.tokens.add(GH_TOKEN)
        env = _app_env(UDQUANT_SPACE_TEST_TOKEN=TEST_TOKEN, DOCKER_HOST=engine.docker_host,
                       UDQUANT_SPACE_POLL_SECONDS="1", UDQUANT_GITHUB_API=github.url)
        process = subprocess.Popen([sys.executable, str(APP), "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the Space exited with {process.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the Space did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield {"url": url, "log": log, "jobs": jobs, "github": github, "engine": engine}
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert TEST_TOKEN not in log.read_text() and GH_TOKEN not in log.read_text(), "a token was logged"


@pytest.fixture
def page() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install -y chromium` (the browser tests use Debian's "
                    "Chromium; never `playwright install`)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 1800})
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _fill_and_inspect(page: Any, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.locator("#identity")).to_contain_text("Signed in as alice", timeout=30_000)
    expect(page.locator("#target")).to_contain_text("Local Docker")  # an engine answers next to the app
    repo_box = page.locator("#repo-id").get_by_role("textbox")
    repo_box.press_sequentially("someone/bad id!")
    expect(page.locator("#repo-check")).to_contain_text("owner/name")
    _shot(page, "01-invalid-repo-id")
    repo_box.fill("")
    repo_box.press_sequentially(REPO)
    expect(page.locator("#repo-check")).to_contain_text(f"✓ {REPO}")
    page.locator("#levels").get_by_label("UD-Q4_K_XL").check()
    page.locator("#inspect").click()
    inspection = page.locator("#inspection")
    expect(inspection).to_contain_text("LlamaForCausalLM", timeout=30_000)
    for text in ("8.03 B", "16.06 GB", "meta-llama/Llama-3.1-8B", "UD-Q5_K_XL", "UD-Q4_K_XL", "5.52 GB",
                 "the distill's own published imatrix"):
        expect(inspection).to_contain_text(text)
    expect(page.locator("#estimates")).to_contain_text("l40sx1")
    _shot(page, "02-inspected")


def _choose_flavor(page: Any, name: str) -> None:
    from playwright.sync_api import expect

    page.locator("#flavor").get_by_role("combobox").click()
    page.get_by_role("option", name=name).click()
    expected = re.compile(rf"^{name}: ~\d+ min, ~\$\d+\.\d\d")
    expect(page.locator("#flavor").get_by_role("combobox")).to_have_value(expected)


def _minutes(estimates: str, flavor: str) -> int:
    match = re.search(rf"{flavor}\s.*?(\d+) min", estimates)
    assert match, estimates
    return int(match.group(1))


def _wait_for_minutes(page: Any, flavor: str, wanted: Callable[[int], bool]) -> int:
    """The flavor's estimated minutes once they satisfy wanted (the table is re-rendered, not patched)."""
    deadline = time.monotonic() + 30
    while True:
        text = page.locator("#estimates").inner_text()
        if flavor in text and wanted(minutes := _minutes(text, flavor)):
            return minutes
        assert time.monotonic() < deadline, text
        page.wait_for_timeout(200)


def _start_a_long_hf_job(space: dict[str, Any], page: Any) -> None:
    """An HF Job that keeps running, started from the form and shown as running."""
    from playwright.sync_api import expect

    space["jobs"].progression = ["SCHEDULING"] + ["RUNNING"] * 10_000
    _fill_and_inspect(page, space["url"])
    page.locator("#confirm").get_by_role("checkbox").check()
    page.locator("#submit").click()
    expect(page.locator("#job-status")).to_contain_text("running", timeout=30_000)


def test_inspect_submit_watch_and_link(space: dict[str, Any], page: Any) -> None:
    from playwright.sync_api import expect

    jobs: HubJobs = space["jobs"]
    _fill_and_inspect(page, space["url"])
    # Measuring quality re-prices the shown estimates (without asking the Hub again), and unticking restores them.
    estimates = page.locator("#estimates")
    plain = estimates.inner_text()
    page.locator("#evaluate").get_by_role("checkbox").check()
    before = _minutes(plain, "l40sx1")
    assert _wait_for_minutes(page, "l40sx1", lambda minutes: minutes != before) > before
    page.locator("#evaluate").get_by_role("checkbox").uncheck()
    _wait_for_minutes(page, "l40sx1", lambda minutes: minutes == before)
    page.locator("#target").get_by_label("HF Jobs").check()
    _choose_flavor(page, "l40sx1")
    page.locator("#submit").click()
    expect(page.locator("#job-info")).to_contain_text("tick the confirmation")
    assert jobs.created == []  # nothing is spent without the confirmation
    page.locator("#confirm").get_by_role("checkbox").check()
    # What the job would refuse at its start is refused here, before a GPU is billed.
    hub = jobs.server.state
    hub.add_repo("alice/Distill-8B-UD-GGUF", {"README.md": b"# alice's own quants"})
    page.locator("#submit").click()
    expect(page.locator("#job-info")).to_contain_text(
        "alice/Distill-8B-UD-GGUF already exists and was not made by udquant", timeout=30_000)
    assert jobs.created == []
    del hub.repos["alice/Distill-8B-UD-GGUF"]
    _shot(page, "03-confirmed")
    page.locator("#submit").click()
    expect(page.locator("#job-info")).to_contain_text("Started hf-jobs job", timeout=30_000)
    expect(page.locator("#job-status")).to_contain_text("running", timeout=30_000)
    _shot(page, "04-running")
    expect(page.locator("#job-status")).to_contain_text("completed", timeout=60_000)
    link = page.locator("#job-link a")
    expected = f"{jobs.server.url}/alice/Distill-8B-UD-GGUF"
    expect(link).to_have_attribute("href", expected)
    expect(page.locator("#job-logs").get_by_role("textbox")).to_have_value(
        re.compile(r"every tensor has the recipe's type"))
    _shot(page, "05-completed-with-link")
    (spec,) = jobs.created
    assert spec["dockerImage"] == "ghcr.io/udquant/udquant-job:0.1.0"
    assert spec["flavor"] == "l40sx1"
    assert spec["command"] == ["udquant-job", REPO, "--quant", "UD-Q5_K_XL", "--quant", "UD-Q4_K_XL",
                               "--recipe", "auto", "--imatrix", "auto", "--upload"]
    assert spec["secrets"] == {"HF_TOKEN": TEST_TOKEN}
    assert TEST_TOKEN not in str({k: v for k, v in spec.items() if k != "secrets"})
    assert TEST_TOKEN not in page.content()


def test_one_running_job_per_user_and_cancel(space: dict[str, Any], page: Any) -> None:
    from playwright.sync_api import expect

    jobs: HubJobs = space["jobs"]
    _start_a_long_hf_job(space, page)
    page.locator("#submit").click()
    expect(page.locator("#job-info")).to_contain_text("one running job per user", timeout=30_000)
    _shot(page, "06-queue-limit")
    assert len(jobs.created) == 1
    page.locator("#cancel").click()
    expect(page.locator("#job-status")).to_contain_text("canceled", timeout=30_000)
    _shot(page, "07-canceled")


def test_a_job_started_before_the_page_opened_is_followed(space: dict[str, Any], page: Any) -> None:
    """The page was reloaded, or the Space restarted, while the user's job ran: the page follows it again, and it
    still holds the user's one-job slot."""
    from playwright.sync_api import expect

    from udquant.dispatch.base import make_request
    from udquant.dispatch.hf_jobs import HfJobsBackend

    jobs: HubJobs = space["jobs"]
    jobs.progression = ["SCHEDULING"] + ["RUNNING"] * 10_000
    earlier = HfJobsBackend(TEST_TOKEN, endpoint=jobs.server.url).start(make_request(REPO, "alice"))
    following = f"Following your hf-jobs job {earlier.job_id} (uploading to alice/Distill-8B-UD-GGUF), started earlier"
    _fill_and_inspect(page, space["url"])
    expect(page.locator("#job-info")).to_contain_text(following, timeout=30_000)
    expect(page.locator("#job-status")).to_contain_text("running", timeout=30_000)
    _shot(page, "11-followed-after-restart")
    page.locator("#confirm").get_by_role("checkbox").check()
    page.locator("#submit").click()
    expect(page.locator("#job-info")).to_contain_text(f"job {earlier.job_id} (hf-jobs) is still running",
                                                      timeout=30_000)
    page.reload()
    expect(page.locator("#job-info")).to_contain_text(following, timeout=30_000)
    page.locator("#cancel").click()
    expect(page.locator("#job-status")).to_contain_text("canceled", timeout=30_000)
    assert len(jobs.created) == 1


def test_a_refused_token_stops_the_polling_until_the_page_is_opened_again(space: dict[str, Any], page: Any) -> None:
    from playwright.sync_api import expect

    jobs: HubJobs = space["jobs"]
    _start_a_long_hf_job(space, page)
    status = page.locator("#job-status")
    jobs.users.clear()  # the token was revoked while the job ran
    expect(status).to_contain_text("Polling stopped", timeout=30_000)
    _shot(page, "12-token-refused")
    jobs.users[TEST_TOKEN] = "alice"
    page.wait_for_timeout(2_500)  # two more ticks would have shown "running" again
    expect(status).to_contain_text("Polling stopped")
    page.reload()
    expect(page.locator("#job-info")).to_contain_text("Following your hf-jobs job", timeout=30_000)
    expect(status).to_contain_text("running", timeout=30_000)


def test_dispatch_to_a_self_hosted_github_runner(space: dict[str, Any], page: Any) -> None:
    from playwright.sync_api import expect

    github: FakeGitHub = space["github"]
    _fill_and_inspect(page, space["url"])
    expect(page.locator("#github-repo")).to_be_hidden()
    page.locator("#target").get_by_label("GitHub self-hosted runner").check()
    expect(page.locator("#flavor")).to_be_hidden()
    page.locator("#github-repo").get_by_role("textbox").fill("me/udquant-runner")
    page.locator("#submit").click()  # no token yet: said in the page's words, nothing dispatched
    expect(page.locator("#job-info")).to_contain_text("Enter a GitHub token", timeout=30_000)
    assert github.state.runs == {}
    page.locator("#github-token").locator("input").fill(GH_TOKEN)
    page.locator("#evaluate").get_by_role("checkbox").check()
    _shot(page, "08-github-target")
    page.locator("#submit").click()
    expect(page.locator("#job-info")).to_contain_text("Started github job", timeout=60_000)
    expect(page.locator("#job-status")).to_contain_text("in_progress", timeout=30_000)
    (run,) = github.state.runs.values()
    assert run.inputs == {"repo": REPO, "levels": "UD-Q5_K_XL UD-Q4_K_XL", "recipe": "auto", "imatrix": "auto",
                          "private": "false", "eval": "true", "image-tag": "0.1.0"}
    assert space["jobs"].created == []  # nothing went to HF Jobs
    github.state.finish(run.id, "success", ["INFO verify: every tensor has the recipe's type",
                                            "https://huggingface.co/me/Distill-8B-UD-GGUF", "Post job cleanup."])
    expect(page.locator("#job-status")).to_contain_text("completed", timeout=30_000)
    expect(page.locator("#job-link a")).to_have_attribute("href", "https://huggingface.co/me/Distill-8B-UD-GGUF")
    _shot(page, "09-github-completed")


def test_local_docker_job_to_its_link_and_its_container_removed(space: dict[str, Any], page: Any) -> None:
    from playwright.sync_api import expect

    engine: FakeDockerEngine = space["engine"]
    _fill_and_inspect(page, space["url"])
    page.locator("#target").get_by_label("Local Docker").check()
    page.locator("#submit").click()
    expect(page.locator("#job-info")).to_contain_text("Started docker job", timeout=30_000)
    expect(page.locator("#job-status")).to_contain_text("running", timeout=30_000)
    (container_id,) = engine.state.containers
    create = next(body for _, path, body in engine.state.requests if path.startswith("/containers/create"))
    assert create is not None and create["HostConfig"]["Binds"] == ["udquant-data:/data:rw"]
    link = "https://huggingface.co/alice/Distill-8B-UD-GGUF"
    engine.finish(container_id, 0, stdout=[link], stderr=["INFO verify: every tensor has the recipe's type"])
    expect(page.locator("#job-status")).to_contain_text("completed", timeout=30_000)
    expect(page.locator("#job-link a")).to_have_attribute("href", link)
    assert container_id not in engine.state.containers  # removed once the result was shown
    page.wait_for_timeout(2_500)  # later ticks change nothing: the handle was dropped with the container
    expect(page.locator("#job-status")).to_contain_text("completed")
    _shot(page, "10-docker-completed")
    page.locator("#submit").click()  # the slot is free again
    expect(page.locator("#job-status")).to_contain_text("running", timeout=30_000)
    assert len(engine.state.containers) == 1 and container_id not in engine.state.containers


def test_docker_jobs_of_an_earlier_space_are_followed_and_their_ended_containers_removed(
        space: dict[str, Any], page: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted Space (or a closed tab) left two containers of alice's: an ended one, which still holds her token,
    and a running one. Opening the page removes the first and follows the second, which holds her one-job slot."""
    from playwright.sync_api import expect

    from udquant.dispatch.base import make_request
    from udquant.dispatch.docker_backend import DockerBackend

    engine: FakeDockerEngine = space["engine"]
    monkeypatch.setenv("DOCKER_HOST", engine.docker_host)
    earlier = DockerBackend(TEST_TOKEN, user="alice")
    ended = earlier.start(make_request(REPO, "alice"))
    engine.finish(ended.job_id, 0, stdout=["https://huggingface.co/alice/Distill-8B-UD-GGUF"])
    running = earlier.start(make_request(REPO, "alice"))
    DockerBackend(TEST_TOKEN, user="bob").start(make_request(REPO, "bob"))  # not alice's: left alone
    assert len(engine.state.containers) == 3
    _fill_and_inspect(page, space["url"])
    expect(page.locator("#job-info")).to_contain_text(f"Following your docker job {running.job_id}", timeout=30_000)
    expect(page.locator("#job-status")).to_contain_text("running", timeout=30_000)
    assert ended.job_id not in engine.state.containers and running.job_id in engine.state.containers
    assert len(engine.state.containers) == 2
    page.locator("#target").get_by_label("Local Docker").check()
    page.locator("#submit").click()
    expect(page.locator("#job-info")).to_contain_text(f"job {running.job_id} (docker) is still running",
                                                      timeout=30_000)
    page.locator("#cancel").click()
    expect(page.locator("#job-status")).to_contain_text("canceled", timeout=30_000)
    assert running.job_id not in engine.state.containers  # released once its end was shown


def test_a_followed_container_that_removed_itself_points_to_where_its_result_would_be() -> None:
    from udquant.dispatch.base import DispatchError, JobHandle

    app = load_app_module()
    gone = DispatchError("docker", "containers.get: No such container: abc123", status_code=404)
    message = app.gone_message(JobHandle("docker", "abc123", "host", "alice/X-UD-GGUF"), gone)
    assert "it ended and was removed" in message and "/alice/X-UD-GGUF)" in message
    assert app.gone_message(JobHandle("docker", "abc123", "host", None), gone) == f"⚠️ {gone}"
    assert app.gone_message(JobHandle("hf-jobs", "j1", "alice", "alice/X-UD-GGUF"), gone) == f"⚠️ {gone}"


def test_a_sign_in_that_would_expire_before_the_upload_is_refused() -> None:
    app = load_app_module()
    now = 1_800_000_000.0
    assert app.sign_in_too_short(None, now) is None
    assert app.sign_in_too_short(now + 24 * 3600, now) is None
    message = app.sign_in_too_short(now + 3 * 3600, now)
    assert message and "expires in 3.0 h" in message and "sign in again" in message
    assert app.config_from_env({"SPACE_ID": "me/udquant"}, "0.0.0.0", 7860).in_space
    assert not app.config_from_env({}, "127.0.0.1", 7860).in_space


# -- the test-token mode cannot be switched on in production ------------------------------------------
def test_test_token_is_refused_in_a_space_and_off_loopback() -> None:
    app = load_app_module()
    refused = app.TestTokenRefusedError
    assert app.test_token_from_env({}, "127.0.0.1") is None
    assert app.test_token_from_env({app.TEST_TOKEN_ENV: "t"}, "127.0.0.1") == "t"
    with pytest.raises(refused, match="refused in a Space"):
        app.test_token_from_env({app.TEST_TOKEN_ENV: "t", "SPACE_ID": "udquant/space"}, "127.0.0.1")
    with pytest.raises(refused, match="refused in a Space"):
        app.test_token_from_env({app.TEST_TOKEN_ENV: "t", "SYSTEM": "spaces"}, "127.0.0.1")
    for host in ("0.0.0.0", "localhost", "::"):
        with pytest.raises(refused, match="127.0.0.1"):
            app.test_token_from_env({app.TEST_TOKEN_ENV: "t"}, host)


@pytest.mark.parametrize(("extra", "host", "message"), [
    ({"SPACE_ID": "udquant/space", "SYSTEM": "spaces"}, "0.0.0.0", "refused in a Space"),
    ({"SPACE_ID": "udquant/space"}, "127.0.0.1", "refused in a Space"),
    ({}, "0.0.0.0", "only when the app binds to 127.0.0.1"),
])
def test_the_app_refuses_to_start_with_a_test_token_in_production(extra: dict[str, str], host: str,
                                                                   message: str, tmp_path: Path) -> None:
    env = _app_env(UDQUANT_SPACE_TEST_TOKEN=TEST_TOKEN, DOCKER_HOST=f"unix://{tmp_path}/none.sock", **extra)
    done = subprocess.run([sys.executable, str(APP), "--host", host, "--port", str(_free_port())], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert TEST_TOKEN not in done.stdout + done.stderr
