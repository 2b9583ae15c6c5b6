"""A self-hosted GitHub Actions runner: dispatch quantize.yml, then follow the run it started.

The dispatch asks for the run it creates (`return_run_details`, github.com since 2026-02). A
server that answers without it (an older GitHub Enterprise Server) gets the old way: the run is
the oldest new one with this model's title (quantize.yml's run-name), on this ref, created since
the dispatch; two dispatches of one model at the same moment could both pick it, so that
fallback is logged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from udquant.dispatch.base import (
    IMAGE_REPOSITORY,
    DispatchError,
    DispatchRequest,
    JobHandle,
    JobStatus,
    output_link_in_logs,
    redact,
    repo_url,
)
from udquant.dispatch.job_command import build_workflow_inputs, image_name

logger = logging.getLogger(__name__)

NAME = "github"
API_URL = "https://api.github.com"
DEFAULT_WORKFLOW = "quantize.yml"
API_VERSION = "2022-11-28"
_REPOSITORY = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
_WORKFLOW = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.ya?ml$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_QUEUED = ("queued", "waiting", "requested", "pending")
RUN_TITLE = "quantize {repo_id}"  # quantize.yml's run-name: how the fallback tells this model's runs apart
CLOCK_SKEW_SECONDS = 60.0  # how far GitHub's clock may be behind this machine's when a new run is looked for
RATE_LIMITED = 429  # the status_code of every rate-limit error, 403 or 429 on the wire: callers may try again later
# A job log line as GitHub stores it: "2026-11-29T10:00:00.1234567Z text", possibly with colour codes.
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z ?")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def validate_repository(repository: str) -> str:
    if not _REPOSITORY.fullmatch(repository) or ".." in repository:
        raise DispatchError(NAME, f"{repository!r} is not a GitHub repository (owner/name)")
    return repository


def web_url(api_url: str) -> str:
    """The web address of the server behind an API URL: https://api.github.com -> https://github.com
    (api.NAME.ghe.com -> NAME.ghe.com), https://HOST/api/v3 (Enterprise Server) -> https://HOST."""
    scheme, _, rest = api_url.rstrip("/").partition("://")
    host, _, path = rest.partition("/")
    if path == "api/v3":
        return f"{scheme}://{host}"
    if not path and host.startswith("api."):
        return f"{scheme}://{host.removeprefix('api.')}"
    return api_url.rstrip("/")


def plain_log_line(line: str) -> str:
    """A job log line as the job wrote it: without GitHub's timestamp prefix and colour codes."""
    return _ANSI.sub("", _TIMESTAMP.sub("", line.lstrip("\ufeff"), count=1))


def _rate_limit_wait(response: httpx.Response) -> str | None:
    """When to try again, in words, if a 403 or 429 is a rate limit; None if it is not one."""
    if response.status_code not in (403, 429):
        return None
    retry_after = response.headers.get("retry-after", "").strip()
    if retry_after:
        return f"try again in {retry_after} s" if retry_after.isdigit() else f"try again after {retry_after}"
    if response.headers.get("x-ratelimit-remaining") == "0":
        reset = response.headers.get("x-ratelimit-reset", "")
        if reset.isdigit():
            minutes = max(int(reset) - time.time(), 0) / 60
            return f"it resets at {datetime.fromtimestamp(int(reset), UTC):%H:%M:%S} UTC (in {minutes:.0f} min)"
        return "it resets within the hour"
    if response.status_code == 429 or "rate limit" in response.text.lower():
        return "wait a minute before trying again"  # GitHub's advice for a secondary limit without headers
    return None


class GitHubBackend:
    name = NAME

    def __init__(self, token: str, repository: str, *, workflow: str = DEFAULT_WORKFLOW, ref: str = "main",
                 api_url: str = API_URL, find_timeout: float = 60.0, poll_interval: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not token:
            raise DispatchError(NAME, "a GitHub token is needed", hint="set GITHUB_TOKEN (actions: write)")
        if not _WORKFLOW.fullmatch(workflow):
            raise DispatchError(NAME, f"{workflow!r} is not a workflow file name")
        if not _REF.fullmatch(ref) or ".." in ref:
            raise DispatchError(NAME, f"{ref!r} is not a branch or tag")
        self.repository = validate_repository(repository)
        self.workflow = workflow
        self.ref = ref
        self.web_url = web_url(api_url)
        self._token = token
        self._find_timeout = find_timeout
        self._poll_interval = poll_interval
        self._sleep = sleep
        self._client = httpx.Client(
            base_url=api_url.rstrip("/"), timeout=30, follow_redirects=True,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                     "X-GitHub-Api-Version": API_VERSION, "User-Agent": "udquant-dispatch"})

    def _request(self, method: str, path: str, *, hints: dict[int, str] | None = None,
                 **kwargs: Any) -> httpx.Response:
        """The response of a request that succeeded; else a DispatchError with a hint for its status (hints
        adds to those every request has)."""
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise DispatchError(NAME, f"{method} {path} failed: {redact(str(err), [self._token])}") from None
        if response.status_code < 400:
            return response
        status, message = response.status_code, redact(response.text[:300], [self._token])
        wait = _rate_limit_wait(response)
        if wait is not None:
            raise DispatchError(NAME, f"{method} {path}: GitHub's API rate limit for this token is reached "
                                      f"({status}); {wait}", status_code=RATE_LIMITED,
                                hint="try again then; the limit counts every request made with this token")
        access = (f"Actions: read and write on {self.repository} for a fine-grained token, "
                  "the repo scope for a classic one")
        every = {401: f"GitHub did not take the token (mistyped, expired or revoked?); it needs {access}",
                 403: f"the token needs {access}"}
        raise DispatchError(NAME, f"{method} {path} answered {status}: {message}", status_code=status,
                            hint=(every | (hints or {})).get(status))

    def _workflow_hints(self) -> dict[int, str]:
        """Why dispatching or listing quantize.yml fails: GitHub says 404, not 403, for what it hides, and 422
        for a workflow on the ref that does not take this dispatch."""
        return {404: f"GitHub answers 404 when the token cannot see {self.repository} (a fine-grained token needs "
                "it among its repositories, with Actions: read and write; a classic one needs the repo scope "
                f"for a private repository) or when .github/workflows/{self.workflow} is not on the default "
                "branch",
                422: f".github/workflows/{self.workflow} on {self.ref} must have the workflow_dispatch trigger "
                     "and the inputs of this release's quantize.yml (repo, levels, recipe, imatrix, private, eval, "
                     "image-tag): update it from udquant's repository"}

    def _runs_path(self) -> str:
        return f"/repos/{self.repository}/actions/workflows/{self.workflow}/runs"

    def _dispatch_runs(self) -> list[dict[str, Any]]:
        response = self._request("GET", self._runs_path(), params={"event": "workflow_dispatch", "per_page": 50},
                                 hints=self._workflow_hints())
        runs = response.json().get("workflow_runs", [])
        return [run for run in runs if isinstance(run, dict)]

    def start(self, request: DispatchRequest) -> JobHandle:
        if request.output_repo is not None:
            raise DispatchError(NAME, "quantize.yml uploads to the runner token's <namespace>/<Name>-UD-GGUF; "
                                      "an output repo cannot be chosen for it")
        owner = self.repository.split("/")[0].lower()
        if image_name(request.image) not in (IMAGE_REPOSITORY, f"ghcr.io/{owner}/udquant-job"):
            raise DispatchError(NAME, f"quantize.yml runs ghcr.io/{owner}/udquant-job (image.yml pushes it); "
                                      f"only its tag can be chosen, not the image {request.image}")
        before = {run["id"] for run in self._dispatch_runs()}
        inputs = build_workflow_inputs(request)
        logger.info("dispatching %s on %s@%s with %s", self.workflow, self.repository, self.ref, inputs)
        dispatched_at = time.time()
        run_id, url = self._dispatch({"ref": self.ref, "inputs": inputs})
        if run_id is None:
            logger.warning("%s did not say which run the dispatch started; taking the first new run of %s "
                           "for %s", self._client.base_url, self.workflow, request.repo_id)
            run = self._find_new_run(before, RUN_TITLE.format(repo_id=request.repo_id), dispatched_at)
            run_id, url = str(run["id"]), str(run.get("html_url") or "")
        return JobHandle(backend=NAME, job_id=run_id, location=self.repository, output_repo=None, url=url)

    def _dispatch(self, body: dict[str, Any]) -> tuple[str | None, str]:
        """POST the dispatch; the started run's (id, page) when the server tells, else (None, "")."""
        path = f"/repos/{self.repository}/actions/workflows/{self.workflow}/dispatches"
        try:
            response = self._request("POST", path, json={**body, "return_run_details": True},
                                     hints=self._workflow_hints())
        except DispatchError as err:
            # A server that does not know the parameter (GHES 3.20 and older) refuses the request with 400
            # or 422 and started nothing; another cause of those fails again without it, and is raised then.
            if err.status_code not in (400, 422):
                raise
            response = self._request("POST", path, json=body, hints=self._workflow_hints())
        details = response.json() if response.status_code == 200 and response.content else {}
        run_id = details.get("workflow_run_id") if isinstance(details, dict) else None
        if run_id is None:
            return None, ""
        return str(run_id), str(details.get("html_url") or "")

    def _find_new_run(self, before: set[Any], title: str, dispatched_at: float) -> dict[str, Any]:
        deadline = time.monotonic() + self._find_timeout
        while True:
            new = [run for run in self._dispatch_runs()
                   if run["id"] not in before and self._may_be_ours(run, title, dispatched_at)]
            if new:
                return min(new, key=lambda run: (str(run.get("created_at", "")), int(run["id"])))
            if time.monotonic() >= deadline:
                raise DispatchError(NAME, f"the dispatch was accepted but no new run of {self.workflow} titled "
                                          f"{title!r} on {self.ref} appeared within {self._find_timeout:.0f} s",
                                    hint=f"look at {self.web_url}/{self.repository}/actions/workflows/{self.workflow}")
            self._sleep(self._poll_interval)

    def _may_be_ours(self, run: dict[str, Any], title: str, dispatched_at: float) -> bool:
        """A run another dispatch started differs in its title (another model), its branch or its age; a field a
        server leaves out is not held against the run."""
        if run.get("display_title") not in (None, title):
            return False
        branch = re.sub(r"^refs/(heads|tags)/", "", self.ref)
        if run.get("head_branch") not in (None, branch):
            return False
        try:
            created = datetime.fromisoformat(str(run["created_at"])).timestamp()
        except (KeyError, ValueError):
            return True
        return created >= dispatched_at - CLOCK_SKEW_SECONDS

    def _run(self, handle: JobHandle) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", f"/repos/{handle.location}/actions/runs/{handle.job_id}").json()
        return data

    def status(self, handle: JobHandle) -> JobStatus:
        run = self._run(handle)
        status, conclusion = str(run.get("status")), str(run.get("conclusion"))
        if status in _QUEUED:
            return JobStatus("queued", status)
        if status != "completed":
            return JobStatus("running", status)
        if conclusion == "success":
            return JobStatus("completed", conclusion)
        if conclusion == "cancelled":
            return JobStatus("canceled", conclusion)
        return JobStatus("failed", conclusion)

    def logs(self, handle: JobHandle, tail: int = 50) -> list[str]:
        """The last lines of the run's job logs, without GitHub's timestamps and colour codes.

        GitHub has a job's log only once the job has finished; until then its steps and their states,
        from the same listing, stand in for it, so that a poll costs one request and not one per job.
        """
        runs = f"/repos/{handle.location}/actions/runs/{handle.job_id}"
        jobs = self._request("GET", f"{runs}/jobs").json().get("jobs", [])
        lines: list[str] = []
        for job in jobs:
            name = job.get("name", "job")
            if job.get("status") != "completed":
                lines.append(f"({name}: {job.get('status', '')}; its log appears when it has finished)")
                lines += [f"  {step.get('name', '')}: {step.get('conclusion') or step.get('status', '')}"
                          for step in job.get("steps") or [] if isinstance(step, dict)]
                continue
            try:
                text = self._request("GET", f"/repos/{handle.location}/actions/jobs/{job['id']}/logs").text
            except DispatchError as err:
                if err.status_code != 404:
                    raise
                text = f"({name}: {job.get('conclusion', '')}; its log is not available)"
            lines += map(plain_log_line, text.splitlines())
        return [redact(line, [self._token]) for line in lines][-tail:]

    def cancel(self, handle: JobHandle) -> None:
        """Cancel the run; one that has already ended is left as it ended (GitHub answers 409 Conflict)."""
        try:
            self._request("POST", f"/repos/{handle.location}/actions/runs/{handle.job_id}/cancel")
        except DispatchError as err:
            if err.status_code != 409 or not self.status(handle).terminal:
                raise
            logger.info("run %s has already ended: nothing to cancel", handle.job_id)

    def result_link(self, handle: JobHandle) -> str | None:
        """The uploaded repo's URL once the run has completed: the handle's output repo when it is known, else the
        last <namespace>/<Name>-UD-GGUF URL in the log (the job prints it; later steps follow it); None when
        neither is there (the run's page, handle.url, is no output repo)."""
        if self.status(handle).state != "completed":
            return None
        if handle.output_repo is not None:
            return repo_url(handle.output_repo)
        return output_link_in_logs(self.logs(handle, tail=400))

    def release(self, handle: JobHandle) -> None:
        """Nothing to free: the service keeps an ended job's record and log itself."""

    def close(self) -> None:
        self._client.close()
