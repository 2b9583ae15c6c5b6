"""A self-hosted GitHub Actions runner: dispatch quantize.yml, then follow the run it started.

The dispatch asks for the run it creates (`return_run_details`, github.com since 2026-02). A
server that answers without it (an older GitHub Enterprise Server) gets the old way: the run is
the oldest one that did not exist before the dispatch, which two dispatches at the same moment
could both pick, so that fallback is logged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
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


def validate_repository(repository: str) -> str:
    if not _REPOSITORY.match(repository) or ".." in repository:
        raise DispatchError(NAME, f"{repository!r} is not a GitHub repository (owner/name)")
    return repository


class GitHubBackend:
    name = NAME

    def __init__(self, token: str, repository: str, *, workflow: str = DEFAULT_WORKFLOW, ref: str = "main",
                 api_url: str = API_URL, find_timeout: float = 60.0, poll_interval: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not token:
            raise DispatchError(NAME, "a GitHub token is needed", hint="set GITHUB_TOKEN (actions: write)")
        if not _WORKFLOW.match(workflow):
            raise DispatchError(NAME, f"{workflow!r} is not a workflow file name")
        if not _REF.match(ref) or ".." in ref:
            raise DispatchError(NAME, f"{ref!r} is not a branch or tag")
        self.repository = validate_repository(repository)
        self.workflow = workflow
        self.ref = ref
        self._token = token
        self._find_timeout = find_timeout
        self._poll_interval = poll_interval
        self._sleep = sleep
        self._client = httpx.Client(
            base_url=api_url.rstrip("/"), timeout=30, follow_redirects=True,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                     "X-GitHub-Api-Version": API_VERSION, "User-Agent": "udquant-dispatch"})

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise DispatchError(NAME, f"{method} {path} failed: {redact(str(err), [self._token])}") from None
        if response.status_code >= 400:
            message = redact(response.text[:300], [self._token])
            hint = "the token needs actions: write on the repository" if response.status_code in (401, 403) else None
            raise DispatchError(NAME, f"{method} {path} answered {response.status_code}: {message}",
                                status_code=response.status_code, hint=hint)
        return response

    def _runs_path(self) -> str:
        return f"/repos/{self.repository}/actions/workflows/{self.workflow}/runs"

    def _dispatch_runs(self) -> list[dict[str, Any]]:
        response = self._request("GET", self._runs_path(), params={"event": "workflow_dispatch", "per_page": 50})
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
        run_id, url = self._dispatch({"ref": self.ref, "inputs": inputs})
        if run_id is None:
            logger.warning("%s did not say which run the dispatch started; taking the first new run of %s",
                           self._client.base_url, self.workflow)
            run = self._find_new_run(before)
            run_id, url = str(run["id"]), str(run.get("html_url") or "")
        return JobHandle(backend=NAME, job_id=run_id, location=self.repository, output_repo=None, url=url)

    def _dispatch(self, body: dict[str, Any]) -> tuple[str | None, str]:
        """POST the dispatch; the started run's (id, page) when the server tells, else (None, "")."""
        path = f"/repos/{self.repository}/actions/workflows/{self.workflow}/dispatches"
        try:
            response = self._request("POST", path, json={**body, "return_run_details": True})
        except DispatchError as err:
            # A server that does not know the parameter (GHES 3.20 and older) refuses the request with 400
            # or 422 and started nothing; another cause of those fails again without it, and is raised then.
            if err.status_code not in (400, 422):
                raise
            response = self._request("POST", path, json=body)
        details = response.json() if response.status_code == 200 and response.content else {}
        run_id = details.get("workflow_run_id") if isinstance(details, dict) else None
        if run_id is None:
            return None, ""
        return str(run_id), str(details.get("html_url") or "")

    def _find_new_run(self, before: set[Any]) -> dict[str, Any]:
        deadline = time.monotonic() + self._find_timeout
        while True:
            new = [run for run in self._dispatch_runs() if run["id"] not in before]
            if new:
                return min(new, key=lambda run: (str(run.get("created_at", "")), int(run["id"])))
            if time.monotonic() >= deadline:
                raise DispatchError(NAME, f"the dispatch was accepted but no new run of {self.workflow} appeared "
                                          f"within {self._find_timeout:.0f} s",
                                    hint=f"look at https://github.com/{self.repository}/actions")
            self._sleep(self._poll_interval)

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
        runs = f"/repos/{handle.location}/actions/runs/{handle.job_id}"
        jobs = self._request("GET", f"{runs}/jobs").json().get("jobs", [])
        lines: list[str] = []
        for job in jobs:
            try:
                text = self._request("GET", f"/repos/{handle.location}/actions/jobs/{job['id']}/logs").text
            except DispatchError as err:
                if err.status_code != 404:
                    raise
                text = f"({job.get('name', 'job')}: {job.get('status', '')}; its log appears when it has finished)"
            lines += text.splitlines()
        return [redact(line, [self._token]) for line in lines][-tail:]

    def cancel(self, handle: JobHandle) -> None:
        self._request("POST", f"/repos/{handle.location}/actions/runs/{handle.job_id}/cancel")

    def result_link(self, handle: JobHandle) -> str | None:
        """The uploaded repo's URL the job printed (CI steps follow it); else the run's page, whose summary has it."""
        if self.status(handle).state != "completed":
            return None
        return output_link_in_logs(self.logs(handle, tail=400)) or handle.url

    def release(self, handle: JobHandle) -> None:
        """Nothing to free: the service keeps an ended job's record and log itself."""

    def close(self) -> None:
        self._client.close()
