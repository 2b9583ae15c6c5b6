"""A fake GitHub REST API (the Actions endpoints udquant's github backend uses), over http on 127.0.0.1.

  POST /repos/{o}/{r}/actions/workflows/{wf}/dispatches      200 with the run's id when asked (return_run_details),
                                                              as github.com; `run_details` plays older servers:
                                                              "ignored" (204), "rejected" (422) or "rejected-400"
                                                              (GHES 3.20 and older). The run is
                                                              listed after `run_delay` listings
  GET  /repos/{o}/{r}/actions/workflows/{wf}/runs?event=...   newest first, like GitHub
  GET  /repos/{o}/{r}/actions/runs/{id}                       the run (display_title: quantize.yml's run-name)
  GET  /repos/{o}/{r}/actions/runs/{id}/jobs                  its jobs, with their steps
  GET  /repos/{o}/{r}/actions/jobs/{id}/logs                  302 to the plain-text log; 404 while running
  POST /repos/{o}/{r}/actions/runs/{id}/cancel                202; 409 Conflict once the run has ended, or for
                                                              a run in `stuck` (never queued, as GitHub says)
Requests need `Authorization: Bearer <token>` with a token in `tokens`; as on GitHub, a repository the token
cannot see (not in `repositories`, when that is set) and a workflow file that is not there (not in `workflows`,
when set) answer 404, a POST with a token in `read_only_tokens` 403, and every request while `rate_limit` is
"primary" 403 with x-ratelimit-remaining 0, while it is "secondary" 429 with retry-after. Every answer carries
x-ratelimit-* headers. The API is served at / (as api.github.com) and at /api/v3 (as an Enterprise Server).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.fakes.http import JSONHandler


@dataclass
class FakeRun:
    id: int
    repository: str
    workflow: str
    ref: str
    inputs: dict[str, Any]
    job_id: int
    created_at: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    status: str = "queued"
    conclusion: str | None = None
    log: list[str] = field(default_factory=list)
    visible_after: int = 0  # listings to wait before the run shows up

    def payload(self, base: str) -> dict[str, Any]:
        return {"id": self.id, "name": "quantize", "display_title": f"quantize {self.inputs.get('repo', '')}",
                "event": "workflow_dispatch", "status": self.status,
                "conclusion": self.conclusion, "head_branch": self.ref, "created_at": self.created_at,
                "html_url": f"{base}/{self.repository}/actions/runs/{self.id}", "path": f".github/workflows/"
                f"{self.workflow}"}


class GitHubState:
    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.runs: dict[int, FakeRun] = {}
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.run_delay = 1  # listings after a dispatch before its run is listed (GitHub is eventually consistent)
        self.run_details = "returned"  # "ignored", "rejected", "rejected-400": a server without return_run_details
        self.repositories: set[str] | None = None  # None: the token sees every repository
        self.workflows: set[str] | None = None  # None: every workflow file is there
        self.declared_inputs: set[str] | None = None  # the workflow's inputs on the ref (None: whatever is sent)
        self.read_only_tokens: set[str] = set()  # may read, not dispatch or cancel (403)
        self.stuck: set[int] = set()  # runs GitHub cannot cancel although they have not ended (409)
        self.rate_limit: str | None = None  # "primary" or "secondary": every request is refused
        self.rate_limit_reset = int(time.time()) + 1800  # when a primary limit resets (epoch seconds)
        self.ids = itertools.count(1000)
        self.lock = threading.Lock()

    def add_run(self, repository: str, inputs: dict[str, Any], *, ref: str = "main", workflow: str = "quantize.yml",
                created_at: str | None = None, visible_after: int = 0) -> FakeRun:
        """A run that another dispatch started (another user, model or branch)."""
        with self.lock:
            run_id = next(self.ids)
            run = FakeRun(run_id, repository, workflow, ref, inputs, job_id=run_id * 10, visible_after=visible_after)
            if created_at is not None:
                run.created_at = created_at
            self.runs[run_id] = run
        return run

    def finish(self, run_id: int, conclusion: str, log: list[str]) -> None:
        with self.lock:
            run = self.runs[run_id]
            run.status, run.conclusion = "completed", conclusion
            run.log += log


class _Handler(JSONHandler):
    state: GitHubState
    base_url: str

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def send_body(self, status: int, body: bytes = b"", content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
        limited = self.state.rate_limit == "primary"
        rate = {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0" if limited else "4321",
                "x-ratelimit-used": "5000" if limited else "679", "x-ratelimit-reset": str(self.state.rate_limit_reset),
                "x-ratelimit-resource": "core"}
        super().send_body(status, body, content_type, {**rate, **(headers or {})})

    def _route(self) -> None:
        url = urlparse(self.path)
        path, query = url.path.removeprefix("/api/v3"), parse_qs(url.query)
        raw = self.read_body()
        body = json.loads(raw) if raw else None
        with self.state.lock:
            self.state.requests.append((self.command, self.path, dict(self.headers), body))
        if match := re.fullmatch(r"/_logs/(\d+)", path):  # the redirect target: no token needed, like GitHub's blob
            return self._log(int(match.group(1)))
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if not auth.startswith("Bearer ") or token not in self.state.tokens | self.state.read_only_tokens:
            return self.send_json({"message": "Bad credentials"}, 401)
        if self.state.rate_limit == "primary":
            return self.send_json({"message": "API rate limit exceeded for user ID 1."}, 403)
        if self.state.rate_limit == "secondary":
            return self.send_json({"message": "You have exceeded a secondary rate limit. Please wait a few minutes "
                                              "before you try again."}, 429, headers={"retry-after": "60"})
        if match := re.match(r"/repos/([^/]+/[^/]+)/", path):
            repositories, workflows = self.state.repositories, self.state.workflows
            workflow = re.match(r"/repos/[^/]+/[^/]+/actions/workflows/([^/]+)/", path)
            if (repositories is not None and match.group(1) not in repositories) or (
                    workflow and workflows is not None and workflow.group(1) not in workflows):
                return self.send_json({"message": "Not Found"}, 404)
        if self.command == "POST" and token in self.state.read_only_tokens:
            return self.send_json({"message": "Resource not accessible by personal access token"}, 403)
        if match := re.fullmatch(r"/repos/([^/]+/[^/]+)/actions/workflows/([^/]+)/dispatches", path):
            return self._dispatch(match.group(1), match.group(2), body or {})
        if match := re.fullmatch(r"/repos/([^/]+/[^/]+)/actions/workflows/([^/]+)/runs", path):
            return self._list(match.group(1), match.group(2), query)
        if match := re.fullmatch(r"/repos/([^/]+/[^/]+)/actions/runs/(\d+)(/jobs|/cancel)?", path):
            return self._run(match.group(1), int(match.group(2)), match.group(3) or "")
        if match := re.fullmatch(r"/repos/([^/]+/[^/]+)/actions/jobs/(\d+)/logs", path):
            return self._job_logs(int(match.group(2)))
        self.send_json({"message": "Not Found"}, 404)

    def _dispatch(self, repository: str, workflow: str, body: dict[str, Any]) -> None:
        if "ref" not in body:
            return self.send_json({"message": "Invalid request: ref is missing"}, 422)
        unexpected = sorted(set(body.get("inputs") or {}) - self.state.declared_inputs) \
            if self.state.declared_inputs is not None else []
        if unexpected:  # GitHub's answer for inputs the workflow on the ref does not declare
            return self.send_json({"message": f"Unexpected inputs provided: {json.dumps(unexpected)}"}, 422)
        wants_details = body.get("return_run_details") is True
        if wants_details and self.state.run_details.startswith("rejected"):
            return self.send_json({"message": "Invalid request.\n\n\"return_run_details\" is not a permitted key."},
                                  400 if self.state.run_details == "rejected-400" else 422)
        run_id = next(self.state.ids)
        with self.state.lock:
            run = FakeRun(run_id, repository, workflow, body["ref"], body.get("inputs") or {},
                          job_id=run_id * 10, visible_after=self.state.run_delay)
            self.state.runs[run_id] = run
        if wants_details and self.state.run_details == "returned":
            return self.send_json({"workflow_run_id": run_id,
                                   "run_url": f"{self.base_url}/api/repos/{repository}/actions/runs/{run_id}",
                                   "html_url": run.payload(self.base_url)["html_url"]})
        self.send_body(204)

    def _list(self, repository: str, workflow: str, query: dict[str, list[str]]) -> None:
        event = query.get("event", [None])[0]
        visible = []
        with self.state.lock:
            for run in sorted(self.state.runs.values(), key=lambda r: -r.id):
                if run.repository != repository or run.workflow != workflow:
                    continue
                if run.visible_after > 0:
                    run.visible_after -= 1
                    continue
                if event in (None, "workflow_dispatch"):
                    visible.append(run.payload(self.base_url))
        self.send_json({"total_count": len(visible), "workflow_runs": visible})

    def _run(self, repository: str, run_id: int, action: str) -> None:
        run = self.state.runs.get(run_id)
        if run is None or run.repository != repository:
            return self.send_json({"message": "Not Found"}, 404)
        if action == "/cancel":
            with self.state.lock:
                ended, stuck = run.status == "completed", run.id in self.state.stuck
                if not ended and not stuck:
                    run.status, run.conclusion = "completed", "cancelled"
            if ended:
                return self.send_json({"message": "Cannot cancel a workflow run that is completed."}, 409)
            if stuck:
                return self.send_json({"message": "Cannot cancel a workflow run that has not been queued yet."},
                                      409)
            return self.send_json({}, 202)
        if action == "/jobs":
            job = {"id": run.job_id, "run_id": run.id, "name": "quantize", "status": run.status,
                   "conclusion": run.conclusion, "steps": _steps(run)}
            return self.send_json({"total_count": 1, "jobs": [job]})
        with self.state.lock:
            if run.status == "queued":  # a runner picks it up on the next look
                run.status = "in_progress"
        self.send_json(run.payload(self.base_url))

    def _job_logs(self, job_id: int) -> None:
        run = next((r for r in self.state.runs.values() if r.job_id == job_id), None)
        if run is None or run.status != "completed":
            return self.send_json({"message": "Not Found"}, 404)
        self.send_body(302, headers={"Location": f"{self.base_url}/_logs/{job_id}"})

    def _log(self, job_id: int) -> None:
        run = next((r for r in self.state.runs.values() if r.job_id == job_id), None)
        text = "\n".join(f"2026-11-27T10:00:{i:02d}.0000000Z {line}" for i, line in enumerate(run.log if run else []))
        self.send_body(200, text.encode(), "text/plain")


def _steps(run: FakeRun) -> list[dict[str, Any]]:
    """quantize.yml's steps as GitHub lists them: none while queued, up to "Run the job" while running."""
    if run.status == "queued":
        return []
    names = ["Set up job", "Run actions/checkout@v6", "Check the inputs", "Run the job"]
    steps = [{"name": name, "number": number, "status": "completed", "conclusion": "success"}
             for number, name in enumerate(names, 1)]
    if run.status == "completed":
        steps[-1]["conclusion"] = run.conclusion
    else:
        steps[-1].update(status="in_progress", conclusion=None)
    return steps


class FakeGitHub:
    def __init__(self) -> None:
        self.state = GitHubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.RequestHandlerClass = type("Handler", (_Handler,), {"state": self.state, "base_url": self.url})
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> FakeGitHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeGitHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
