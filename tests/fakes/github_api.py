"""A fake GitHub REST API (the Actions endpoints udquant's github backend uses), over http on 127.0.0.1.

  POST /repos/{o}/{r}/actions/workflows/{wf}/dispatches      200 with the run's id when asked (return_run_details),
                                                              as github.com; `run_details` plays older servers:
                                                              "ignored" (204), "rejected" (422) or "rejected-400"
                                                              (GHES 3.20 and older). The run is
                                                              listed after `run_delay` listings
  GET  /repos/{o}/{r}/actions/workflows/{wf}/runs?event=...   newest first, like GitHub
  GET  /repos/{o}/{r}/actions/runs/{id}                       the run
  GET  /repos/{o}/{r}/actions/runs/{id}/jobs                  its jobs
  GET  /repos/{o}/{r}/actions/jobs/{id}/logs                  302 to the plain-text log; 404 while running
  POST /repos/{o}/{r}/actions/runs/{id}/cancel                202
Requests need `Authorization: Bearer <token>` with a token in `tokens`.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
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
        return {"id": self.id, "name": "quantize", "event": "workflow_dispatch", "status": self.status,
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
        self.ids = itertools.count(1000)
        self.lock = threading.Lock()

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

    def _route(self) -> None:
        url = urlparse(self.path)
        path, query = url.path, parse_qs(url.query)
        raw = self.read_body()
        body = json.loads(raw) if raw else None
        with self.state.lock:
            self.state.requests.append((self.command, self.path, dict(self.headers), body))
        if match := re.fullmatch(r"/_logs/(\d+)", path):  # the redirect target: no token needed, like GitHub's blob
            return self._log(int(match.group(1)))
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth.removeprefix("Bearer ") not in self.state.tokens:
            return self.send_json({"message": "Bad credentials"}, 401)
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
                if run.status != "completed":
                    run.status, run.conclusion = "completed", "cancelled"
            return self.send_json({}, 202)
        if action == "/jobs":
            job = {"id": run.job_id, "run_id": run.id, "name": "quantize", "status": run.status,
                   "conclusion": run.conclusion}
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


class FakeGitHub:
    def __init__(self) -> None:
        self.state = GitHubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.RequestHandlerClass = type("Handler", (_Handler,), {"state": self.state, "base_url": self.url})
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

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
