"""The udquant Space: inspect a distill, then run the job on HF Jobs, a self-hosted GitHub runner or
local Docker, and follow it to the link of the uploaded GGUF repo.

A thin adapter over udquant.dispatch. Run it locally with `python space/app.py` (see README.md).
The token comes from the Hugging Face sign-in (OAuth) and is only handed to a backend; it is
never logged, shown or put into a command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import gradio as gr
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from udquant import __version__
from udquant.dispatch.base import (
    IMATRIX_CHOICES,
    Backend,
    DispatchError,
    JobHandle,
    JobStatus,
    check_upload_target,
    known_result,
    library_levels,
    make_request,
)
from udquant.dispatch.estimate import FlavorEstimate, Hardware
from udquant.dispatch.github import API_URL, DEFAULT_WORKFLOW, GitHubBackend
from udquant.dispatch.hf_jobs import DEFAULT_TIMEOUT_HOURS, HfJobsBackend, describe_hardware, list_hardware
from udquant.dispatch.preview import Inspection, inspect_repo
from udquant.dispatch.queue import JobRegistry
from udquant.errors import UdquantError
from udquant.hub import NO_ANSWER
from udquant.recipe import DEFAULT_LEVEL
from udquant.resolve import validate_repo_id

if TYPE_CHECKING:
    import docker

logger = logging.getLogger("udquant.space")

TEST_TOKEN_ENV = "UDQUANT_SPACE_TEST_TOKEN"
LOOPBACK = "127.0.0.1"
TARGET_HF_JOBS = "HF Jobs"
TARGET_GITHUB = "GitHub self-hosted runner"
TARGET_DOCKER = "Local Docker"
LOG_TAIL = 30
KNOWN_SIGN_INS = 1000  # user names kept by token, so that a poll needs no whoami
# An ended local Docker job that no page released for this long is removed, and the token the engine keeps with it.
ABANDONED_AFTER = timedelta(hours=6)
SWEEP_SECONDS = 600
# Seconds between two looks at a followed job. HF Jobs: a log read of a running job waits about 5 s for
# news. GitHub: each look costs a few requests of the token's 5,000 an hour, shared with its other uses.
POLL_SECONDS = {"hf-jobs": 10.0, "github": 15.0, "docker": 3.0}


class TestTokenRefusedError(RuntimeError):
    """The test-token mode was asked for where it must never run."""


def test_token_from_env(env: Mapping[str, str], host: str) -> str | None:
    """The test token, honoured only off Spaces (no SPACE_ID, SYSTEM != spaces) and bound to 127.0.0.1.

    In a Space, or on any other interface, setting it stops the app instead of silently ignoring it.
    """
    token = env.get(TEST_TOKEN_ENV, "")
    if not token:
        return None
    if env.get("SPACE_ID") or env.get("SYSTEM") == "spaces":
        raise TestTokenRefusedError(f"{TEST_TOKEN_ENV} is refused in a Space (SPACE_ID is set): "
                                    "sign-in there is Hugging Face OAuth only")
    if host != LOOPBACK:
        raise TestTokenRefusedError(f"{TEST_TOKEN_ENV} is honoured only when the app binds to {LOOPBACK}, "
                                    f"not {host}")
    return token


@dataclass(frozen=True)
class SpaceConfig:
    host: str = LOOPBACK
    port: int = 7860
    docker: bool = False  # offer local Docker: a Docker engine answered at start
    github_api: str = API_URL
    poll_seconds: float | None = None  # None: each backend's own interval (POLL_SECONDS)
    test_token: str | None = field(default=None, repr=False)
    in_space: bool = False  # on Hugging Face Spaces: the sign-in is real OAuth, whose token expires


def config_from_env(env: Mapping[str, str], host: str, port: int) -> SpaceConfig:
    from udquant.dispatch.docker_engine import engine_available

    return SpaceConfig(host=host, port=port, docker=engine_available(), test_token=test_token_from_env(env, host),
                       in_space=bool(env.get("SPACE_ID")) or env.get("SYSTEM") == "spaces",
                       github_api=env.get("UDQUANT_GITHUB_API", API_URL),
                       poll_seconds=float(env["UDQUANT_SPACE_POLL_SECONDS"])
                       if env.get("UDQUANT_SPACE_POLL_SECONDS") else None)


# -- text for the page ---------------------------------------------------------------------------
def describe_inspection(found: Inspection) -> str:
    revision = (found.revision or "")[:10]
    base = ", ".join(found.base_models) or "not named in the card"
    rows = [
        f"### {found.repo_id} @ `{revision}`", "", "| model | |", "|---|---|",
        f"| architecture | {found.hf_architecture} → llama.cpp `{found.llama_arch}` |",
        f"| parameters | {found.n_params / 1e9:.2f} B |",
        f"| weights | {found.weights_bytes / 1e9:.2f} GB safetensors |",
        f"| base model | {base} |",
        f"| imatrix | {found.imatrix_source} |",
    ]
    if found.drops_mtp:
        rows.append("| MTP layers | absent from the weights: converted with `--no-mtp` |")
    rows += ["", "| level | recipe | ≈ bits/weight | ≈ output size |", "|---|---|---|---|"]
    rows += [f"| {p.level} | `{p.recipe_id}` | {p.bits_per_weight:.2f} | {p.output_bytes / 1e9:.2f} GB |"
             for p in found.levels]
    return "\n".join(rows)


def describe_estimates(estimates: list[FlavorEstimate]) -> str:
    rows = ["| HF Jobs flavor | GPU | ≈ GPU time | ≈ cost | |", "|---|---|---|---|---|"]
    for e in estimates:
        gpu = f"{e.hardware.gpu_count} x {e.hardware.gpu_model}, {e.hardware.vram_bytes / 1e9:.0f} GB"
        rows.append(f"| {e.hardware.name} | {gpu} | {e.minutes:.0f} min | ${e.cost_usd:.2f} | {e.note} |")
    return "\n".join(rows) + "\n\nEstimates from the parameter count; you pay what the job really uses."


def describe_status(handle: JobHandle, status: JobStatus) -> str:
    detail = f" — {status.detail}" if status.detail and status.detail != status.state else ""
    return f"**{status.state}**{detail} ({handle.backend} job `{handle.job_id}`)"


def describe_followed(handle: JobHandle) -> str:
    where = f" — [job page]({handle.url})" if handle.url else ""
    into = f" (uploading to {handle.output_repo})" if handle.output_repo else ""
    note = f"Following your {handle.backend} job `{handle.job_id}`{into}, started earlier{where}."
    if handle.backend == "github":
        note += " Enter the GitHub token (actions: write) under the GitHub runner target to see its progress."
    return note


def gone_message(handle: JobHandle, err: DispatchError) -> str:
    """A job its backend no longer knows. A container started without being followed removes itself when it
    ends, so its end says nothing about its result: where that would be is said instead."""
    if handle.backend == "docker" and (where := known_result(handle)):
        return (f"The container of job `{handle.job_id[:12]}` is gone: it ended and was removed. If it completed, "
                f"its result is at [{where}]({where}).")
    return problem(err)


def sign_in_too_short(expires_at: float | None, now: float, hours: float = DEFAULT_TIMEOUT_HOURS + 1) -> str | None:
    """Why a job must not start with this OAuth token: it uploads at its end with it, up to `hours` from now."""
    if expires_at is None or expires_at - now >= hours * 3600:
        return None
    left = max(expires_at - now, 0) / 3600
    return (f"⚠️ Your sign-in expires in {left:.1f} h, and the job uploads with it when it ends (up to "
            f"{DEFAULT_TIMEOUT_HOURS} h from now): sign out and sign in again first.")


def problem(err: Exception) -> str:
    return f"⚠️ {err}"


def shown(part: str | None) -> Any:
    """A part of the page to change; None leaves it as it is."""
    return gr.skip() if part is None else part


@dataclass(frozen=True)
class Polled:
    """What one look at a followed job shows (None: leave that part of the page as it is), and which job the
    page follows next (None: none)."""

    status: str | None = None
    logs: str | None = None
    link: str | None = None
    follow: JobHandle | None = None
    polling: bool = True  # whether the timer keeps looking at `follow`


# -- the app -------------------------------------------------------------------------------------
class SpaceSession:
    """What the handlers share: the configuration, who is signed in, and the queue of running jobs."""

    def __init__(self, config: SpaceConfig) -> None:
        self.config = config
        self.registry = JobRegistry()
        self._names: dict[str, str] = {}
        self._docker: docker.DockerClient | None = None
        self._docker_lock = threading.Lock()

    def docker_client(self) -> docker.DockerClient:
        """The engine client every Docker call shares: a new one would first ask the engine its API version."""
        with self._docker_lock:
            if self._docker is None:
                from udquant.dispatch.docker_engine import connect

                self._docker = connect()
            return self._docker

    def sweep_abandoned(self, now: datetime | None = None) -> list[str]:
        """Remove every user's local Docker jobs that ended over ABANDONED_AFTER ago and that no page released (the
        user closed it and never came back): a user's own are removed when they open the page again, but the engine
        must not keep the others' tokens for good."""
        from udquant.dispatch.docker_backend import DockerBackend

        try:
            return DockerBackend.remove_abandoned(self.docker_client(),
                                                  ended_before=(now or datetime.now(UTC)) - ABANDONED_AFTER)
        except DispatchError as err:
            logger.warning("cannot look for abandoned Docker jobs: %s", err.message)
            return []

    def keep_sweeping(self) -> None:
        while True:
            time.sleep(SWEEP_SECONDS)
            try:
                self.sweep_abandoned()
            except Exception:  # a bug must not end the sweeping for the life of the Space
                logger.exception("sweeping abandoned Docker jobs failed")

    def token(self, oauth_token: gr.OAuthToken | None) -> str | None:
        if self.config.test_token:
            return self.config.test_token
        return oauth_token.token if oauth_token is not None else None

    def user(self, token: str) -> str:
        """The Hub user name behind a token: the key of the one-job-per-user limit."""
        if token not in self._names:
            if len(self._names) >= KNOWN_SIGN_INS:  # sign-ins expire: the oldest go first
                del self._names[next(iter(self._names))]
            try:
                self._names[token] = str(HfApi(token=token).whoami()["name"])
            except HfHubHTTPError as err:
                status = err.response.status_code
                if status in (401, 403):
                    raise UdquantError("the Hub did not accept the sign-in token", hint="sign in again") from None
                raise UdquantError(f"the Hub answered HTTP {status} when asked who is signed in",
                                   hint="try again in a minute") from None
            except NO_ANSWER as err:
                raise UdquantError(f"cannot reach the Hub ({type(err).__name__})",
                                   hint="try again in a minute") from None
        return self._names[token]

    def running_job(self, user: str, token: str) -> JobHandle | None:
        """The user's job to follow when a page opens: the one this Space started for them, else their udquant job
        still running on HF Jobs or in the local Docker engine, started before the Space restarted (it then holds
        their one-job slot). Their ended containers that nobody released go first: the engine keeps the token."""
        handle = self.registry.active(user)
        if handle is not None:
            return handle
        found: list[JobHandle] = []
        if self.config.docker:
            from udquant.dispatch.docker_backend import DockerBackend

            try:
                docker_backend = DockerBackend(token, client=self.docker_client(), user=user)
                docker_backend.remove_ended(user)
                found = docker_backend.running_jobs(user)
            except DispatchError as err:
                logger.warning("cannot list the Docker jobs of %s: %s", user, err.message)
        if not found:
            try:
                found = HfJobsBackend(token, namespace=user).running_jobs()
            except DispatchError as err:
                logger.warning("cannot list the HF Jobs of %s: %s", user, err.message)
        return self.registry.adopt(user, found[0]) if found else None

    def poll(self, handle: JobHandle | None, token: str | None, github_token: str) -> Polled:
        """One look at a followed job: its status, log tail and link. Once it has ended, the backend releases what
        it held and the page follows the user's next job, if one was started meanwhile (else nothing: a late tick
        changes nothing). A log that cannot be read does not hide the status; a refused token stops the polling
        until the page is opened again."""
        if handle is None or token is None:
            return Polled(follow=handle, polling=False)
        try:
            with opened(backend_for_handle(self, handle, token, github_token)) as backend:
                return self._look(backend, handle, token)
        except DispatchError as err:
            if err.status_code == 404:  # removed or deleted elsewhere: nothing more to follow
                return self._ended(handle, token, Polled(status=gone_message(handle, err)))
            if err.status_code in (401, 403):  # asking again every few seconds changes nothing
                if handle.backend == "github":  # the user's own runner: the run must not hold their slot for good
                    where = f": see [its run page]({handle.url})" if handle.url else ""
                    return self._ended(handle, token, Polled(status=f"{problem(err)} Not followed any more{where}."))
                return Polled(status=problem(err) + " Polling stopped: reload the page once the token is fixed.",
                              follow=handle, polling=False)
            return Polled(status=problem(err), follow=handle)
        except UdquantError as err:
            return Polled(status=problem(err), follow=handle)

    def _look(self, backend: Backend, handle: JobHandle, token: str) -> Polled:
        status = backend.status(handle)
        seen = describe_status(handle, status)
        lines = None
        try:
            lines = "\n".join(backend.logs(handle, tail=LOG_TAIL))
        except UdquantError as err:
            seen += f"\n\n(log not readable now: {err})"
        if not status.terminal:
            return Polled(status=seen, logs=lines, link="", follow=handle)
        link = None
        try:
            link = backend.result_link(handle) if status.state == "completed" else None
        except UdquantError as err:
            logger.warning("cannot read the result link of %s: %s", handle.job_id, err)
        if status.state == "completed" and link is None:
            link = known_result(handle)
        try:
            backend.release(handle)
        except UdquantError as err:
            logger.warning("cannot release %s job %s: %s", handle.backend, handle.job_id, err)
        if link:
            done = f"**Output repo:** [{link}]({link})"
        elif status.state == "completed" and handle.url:  # the job printed no repo URL: its run tells more
            done = f"The job printed no repo URL; see [its run page]({handle.url})."
        else:
            done = ""
        return self._ended(handle, token, Polled(status=seen, logs=lines, link=done))

    def still_runs(self, handle: JobHandle, token: str, github_token: str) -> bool:
        """Whether the user's previous job still runs, so that no second one starts. A GitHub run the page's token
        cannot see (none entered since a reload, or refused) does not count: it runs on the user's own runner,
        holds nothing of this Space's, and quantize.yml queues the runs of one model itself."""
        try:
            with opened(backend_for_handle(self, handle, token, github_token)) as backend:
                return not backend.status(handle).terminal
        except DispatchError as err:
            if handle.backend == "github" and (not github_token or err.status_code in (401, 403)):
                return False
            raise

    def _ended(self, handle: JobHandle, token: str, polled: Polled) -> Polled:
        """Free the user's slot of an ended job. A job they started meanwhile (its start may answer before this
        tick does) is followed next: the page would otherwise drop its handle."""
        user = self.user(token)
        self.registry.finish(user, handle)
        after = self.registry.active(user)
        return replace(polled, follow=after, polling=after is not None)

    def follow_timer(self, handle: JobHandle) -> gr.Timer:
        """The timer that polls a followed job, at its backend's pace (UDQUANT_SPACE_POLL_SECONDS: one pace)."""
        return gr.Timer(self.config.poll_seconds or POLL_SECONDS[handle.backend], active=True)

    def backend(self, target: str, token: str, flavor: str = "", github_repo: str = "",
                workflow: str = DEFAULT_WORKFLOW, github_token: str = "", user: str | None = None) -> Backend:
        """The backend of a target; user labels a Docker job, so that a restarted Space finds it again."""
        if target == TARGET_GITHUB:
            return GitHubBackend(github_token, github_repo.strip(), workflow=workflow.strip() or DEFAULT_WORKFLOW,
                                 api_url=self.config.github_api)
        if target == TARGET_DOCKER:
            if not self.config.docker:
                raise UdquantError("local Docker is not offered here: no Docker engine answered")
            from udquant.dispatch.docker_backend import DockerBackend

            return DockerBackend(token, client=self.docker_client(), user=user)
        return HfJobsBackend(token, flavor=flavor or "a10g-large")


@contextmanager
def opened(backend: Backend) -> Iterator[Backend]:
    """The backend, closed after the block: a GitHub backend holds an HTTP client, and a page makes one per look."""
    try:
        yield backend
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()


def backend_for_handle(session: SpaceSession, handle: JobHandle, token: str, github_token: str) -> Backend:
    target = {"hf-jobs": TARGET_HF_JOBS, "docker": TARGET_DOCKER, "github": TARGET_GITHUB}[handle.backend]
    return session.backend(target, token, github_repo=handle.location, github_token=github_token)


def build_app(config: SpaceConfig) -> gr.Blocks:
    session = SpaceSession(config)
    if config.docker:
        threading.Thread(target=session.keep_sweeping, name="udquant-docker-sweep", daemon=True).start()
    targets = [TARGET_HF_JOBS, TARGET_GITHUB] + ([TARGET_DOCKER] if config.docker else [])
    levels = list(library_levels())

    demo = gr.Blocks(title="udquant: UD GGUF quants of distills")
    with demo:
        gr.Markdown(f"# udquant {__version__}\nUD-style GGUF quants of a distill, made with the distill's own "
                    "importance matrix, on a GPU of your choice.")
        if config.test_token:
            gr.Markdown("**Test-token mode** (local tests only; refused in a Space).", elem_id="test-mode")
        else:
            gr.LoginButton()
        identity = gr.Markdown(elem_id="identity")

        with gr.Row():
            repo = gr.Textbox(label="Distill repo id", placeholder="owner/Distill-Name", elem_id="repo-id", scale=4)
            inspect_button = gr.Button("Inspect", elem_id="inspect", scale=1)
        repo_check = gr.Markdown(elem_id="repo-check")
        with gr.Row():
            chosen_levels = gr.CheckboxGroup(levels, value=[DEFAULT_LEVEL] if DEFAULT_LEVEL in levels else levels[:1],
                                             label="Levels", elem_id="levels")
            imatrix = gr.Dropdown(list(IMATRIX_CHOICES), value="auto", label="imatrix", elem_id="imatrix")
            private = gr.Checkbox(label="Private output repo", value=False, elem_id="private")
            evaluate = gr.Checkbox(label="Measure quality (KL divergence vs BF16 in the card; adds time)",
                                   value=False, elem_id="evaluate")
        inspection = gr.Markdown(elem_id="inspection")
        estimates = gr.Markdown(elem_id="estimates")
        inspected = gr.State("")  # the repo id the shown inspection is for
        priced = gr.State(None)  # (Inspection, hardware) behind the shown estimates, to re-price without the Hub

        target = gr.Radio(targets, value=TARGET_HF_JOBS, label="Run on", elem_id="target")
        with gr.Group(visible=True) as hf_group:
            flavor = gr.Dropdown([], label="HF Jobs hardware (inspect first)", elem_id="flavor")
            confirm = gr.Checkbox(label="I confirm: this starts a paid HF Job billed to my account", value=False,
                                  elem_id="confirm")
        with gr.Group(visible=False) as github_group:
            github_repo = gr.Textbox(label="GitHub repository (owner/repo) with the quantize workflow",
                                     elem_id="github-repo")
            workflow = gr.Textbox(label="Workflow file", value=DEFAULT_WORKFLOW, elem_id="workflow")
            github_token = gr.Textbox(label="GitHub token (actions: write); used for this dispatch only",
                                      type="password", elem_id="github-token")
        submit = gr.Button("Start the job", variant="primary", elem_id="submit")
        job_info = gr.Markdown(elem_id="job-info")
        job_status = gr.Markdown(elem_id="job-status")
        job_logs = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, interactive=False,
                              elem_id="job-logs")
        job_link = gr.Markdown(elem_id="job-link")
        cancel = gr.Button("Cancel the job", variant="stop", elem_id="cancel")
        handle_state = gr.State(None)
        timer = gr.Timer(config.poll_seconds or POLL_SECONDS["docker"], active=False)

        def open_page(oauth_token: gr.OAuthToken | None) -> tuple[str, Any, Any, Any]:
            """Who is signed in, and their job that still runs (the page was reloaded, or the Space restarted),
            followed again from here."""
            token = session.token(oauth_token)
            if token is None:
                return "Not signed in: sign in with Hugging Face to start jobs.", gr.skip(), gr.skip(), gr.skip()
            try:
                user = session.user(token)
            except UdquantError as err:
                return problem(err), gr.skip(), gr.skip(), gr.skip()
            handle = session.running_job(user, token)
            if handle is None:
                return f"Signed in as **{user}**.", gr.skip(), gr.skip(), gr.skip()
            return f"Signed in as **{user}**.", describe_followed(handle), handle, session.follow_timer(handle)

        def check_repo(text: str) -> str:
            if not text.strip():
                return ""
            try:
                return f"✓ `{validate_repo_id(text.strip())}`"
            except UdquantError:
                return "⚠️ Not a Hub repo id: write it as owner/name (letters, digits, '-', '_', '.')."

        def price(found: Inspection, hardware: list[Hardware], measure: bool) -> tuple[str, Any]:
            flavors = found.estimates(hardware, evaluate=measure)
            choices = [(e.label(), e.hardware.name) for e in flavors]
            first = next((e.hardware.name for e in flavors if e.fits), choices[0][1] if choices else None)
            return describe_estimates(flavors), gr.Dropdown(choices=choices, value=first, label="HF Jobs hardware")

        def run_inspect(text: str, wanted: list[str], mode: str, measure: bool,
                        oauth_token: gr.OAuthToken | None) -> tuple[str, str, Any, str, Any]:
            token = session.token(oauth_token)
            try:
                found = inspect_repo(text.strip(), token=token, levels=tuple(wanted or [DEFAULT_LEVEL]), imatrix=mode)
                hardware = [describe_hardware(info) for info in list_hardware(token)]
            except UdquantError as err:
                return problem(err), "", gr.Dropdown(choices=[], value=None), "", None
            return (describe_inspection(found), *price(found, hardware, measure), found.repo_id, (found, hardware))

        def reprice(data: tuple[Inspection, list[Hardware]] | None, measure: bool) -> tuple[Any, Any]:
            """--eval changes time and disk: the estimates shown must be those of what will run."""
            if data is None:
                return gr.skip(), gr.skip()
            return price(*data, measure)

        def show_target(choice: str) -> tuple[Any, Any]:
            return gr.Group(visible=choice == TARGET_HF_JOBS), gr.Group(visible=choice == TARGET_GITHUB)

        def start_job(text: str, wanted: list[str], mode: str, is_private: bool, measure: bool, choice: str,
                      hardware: str | None,
                      confirmed: bool, gh_repo: str, gh_workflow: str, gh_token: str, inspected_repo: str,
                      oauth_token: gr.OAuthToken | None) -> tuple[str, Any, Any, str, str, str]:
            idle = (gr.skip(),) * 5  # a refused submission leaves a running job's handle and polling alone
            token = session.token(oauth_token)
            if token is None:
                return ("⚠️ Sign in with Hugging Face first.", *idle)
            if text.strip() != inspected_repo:
                return ("⚠️ Inspect the repo first: nothing is spent before you have seen the estimate.", *idle)
            if choice == TARGET_GITHUB and not gh_token.strip():
                return ("⚠️ Enter a GitHub token that may run the workflow (Actions: read and write).", *idle)
            if choice == TARGET_HF_JOBS and not (hardware and confirmed):
                return ("⚠️ Choose the hardware and tick the confirmation: HF Jobs are billed.", *idle)
            if config.in_space and choice != TARGET_GITHUB and oauth_token is not None:
                short = sign_in_too_short(oauth_token.expires_at, time.time())
                if short:
                    return (short, *idle)
            try:
                user = session.user(token)
                namespace = None if choice == TARGET_GITHUB else user
                request = make_request(text.strip(), namespace, levels=wanted, imatrix=mode, private=is_private,
                                       evaluate=measure)
                if choice != TARGET_GITHUB:  # the job uploads with this token: refuse now what it would refuse
                    check_upload_target(request, token)
                with opened(session.backend(choice, token, hardware or "", gh_repo, gh_workflow, gh_token,
                                            user=user)) as backend:
                    handle = session.registry.submit(user, lambda h: session.still_runs(h, token, gh_token),
                                                     lambda: backend.start(request))
            except UdquantError as err:
                return (problem(err), *idle)
            logger.info("%s started %s job %s for %s", user, handle.backend, handle.job_id, request.repo_id)
            where = f" — [job page]({handle.url})" if handle.url else ""
            return (f"Started {handle.backend} job `{handle.job_id}`{where}", handle, session.follow_timer(handle),
                    f"**started** ({handle.backend} job `{handle.job_id}`)", "", "")

        def poll_job(handle: JobHandle | None, gh_token: str,
                     oauth_token: gr.OAuthToken | None) -> tuple[Any, Any, Any, Any, Any]:
            polled = session.poll(handle, session.token(oauth_token), gh_token)
            timer_next = session.follow_timer(polled.follow) if polled.follow and polled.polling \
                else gr.Timer(active=False)
            return shown(polled.status), shown(polled.logs), shown(polled.link), timer_next, polled.follow

        def cancel_job(handle: JobHandle | None, gh_token: str, oauth_token: gr.OAuthToken | None) -> str:
            token = session.token(oauth_token)
            if handle is None or token is None:
                return "No job to cancel."
            try:
                with opened(backend_for_handle(session, handle, token, gh_token)) as backend:
                    backend.cancel(handle)
            except UdquantError as err:
                return problem(err)
            return f"Cancel requested for `{handle.job_id}`."

        demo.load(open_page, inputs=None, outputs=[identity, job_info, handle_state, timer])
        # always_last: while one check runs, only the newest keystroke is checked next.
        repo.input(check_repo, inputs=repo, outputs=repo_check, show_progress="hidden", trigger_mode="always_last")
        inspect_button.click(run_inspect, inputs=[repo, chosen_levels, imatrix, evaluate],
                             outputs=[inspection, estimates, flavor, inspected, priced])
        evaluate.change(reprice, inputs=[priced, evaluate], outputs=[estimates, flavor], show_progress="hidden")
        target.change(show_target, inputs=target, outputs=[hf_group, github_group])
        submit.click(start_job, inputs=[repo, chosen_levels, imatrix, private, evaluate, target, flavor, confirm,
                                        github_repo, workflow, github_token, inspected],
                     outputs=[job_info, handle_state, timer, job_status, job_logs, job_link])
        # Not limited to the queue's 8 at a time: each page polls its own job, and an HF Jobs log read waits ~5 s.
        timer.tick(poll_job, inputs=[handle_state, github_token],
                   outputs=[job_status, job_logs, job_link, timer, handle_state], show_progress="hidden",
                   concurrency_limit=None)
        cancel.click(cancel_job, inputs=[handle_state, github_token], outputs=job_info)
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="udquant Space (Gradio)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", LOOPBACK))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    for name in ("huggingface_hub", "httpx", "urllib3", "docker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        config = config_from_env(os.environ, args.host, args.port)
    except TestTokenRefusedError as err:
        print(f"udquant space: {err}", file=sys.stderr)
        return 2
    if config.test_token:
        print(f"udquant space: test-token mode on {config.host}:{config.port} (local tests only)", file=sys.stderr)
    build_app(config).queue(default_concurrency_limit=8).launch(
        server_name=config.host, server_port=config.port, ssr_mode=False, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
