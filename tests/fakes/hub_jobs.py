"""Hugging Face Jobs endpoints for the local Hub test server (tests/hubserver.py).

The routes are those huggingface_hub's HfApi calls (read from its source, version 2.x):
  GET  /api/whoami-v2                       whoami (run_job etc. without a namespace)
  GET  /api/jobs/hardware                   list_jobs_hardware
  POST /api/jobs/{namespace}                run_job (body: the job spec)
  GET  /api/jobs/{namespace}                list_jobs (?stage=...&label=k=v)
  GET  /api/jobs/{namespace}/{id}           inspect_job
  GET  /api/jobs/{namespace}/{id}/logs      fetch_job_logs (server-sent events, ?tail=N)
  POST /api/jobs/{namespace}/{id}/cancel    cancel_job
A job moves one stage along `progression` each time its status is read, and prints the
lines the real job prints, its last line the URL of the output repo. As the Hub does, it
answers 400 to a flavor not in its hardware list and to a label key or value with a character
other than letters, digits, '-' and '_', and holds a running job's log stream open a while
(`log_hold_s`; the Hub holds it until the client's 5 s read timeout).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.hubserver import HubServer

HARDWARE = [
    {"name": "cpu-basic", "prettyName": "CPU Basic", "cpu": "2 vCPU", "ram": "16 GB", "ephemeralStorage": "50 GB",
     "accelerator": None, "unitCostMicroUSD": 167, "unitCostUSD": 0.000167, "unitLabel": "minute"},
    {"name": "t4-small", "prettyName": "Nvidia T4 - small", "cpu": "4 vCPU", "ram": "15 GB",
     "ephemeralStorage": "50 GB", "accelerator": {"type": "gpu", "model": "T4", "quantity": "1", "vram": "16 GB",
                                                  "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 6667, "unitCostUSD": 0.006667, "unitLabel": "minute"},
    {"name": "a10g-large", "prettyName": "Nvidia A10G - large", "cpu": "12 vCPU", "ram": "46 GB",
     "ephemeralStorage": "200 GB", "accelerator": {"type": "gpu", "model": "A10G", "quantity": "1",
                                                   "vram": "24 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 25000, "unitCostUSD": 0.025, "unitLabel": "minute"},
    {"name": "l40sx1", "prettyName": "Nvidia L40S - 1x", "cpu": "8 vCPU", "ram": "62 GB",
     "ephemeralStorage": "380 GB", "accelerator": {"type": "gpu", "model": "L40S", "quantity": "1",
                                                   "vram": "48 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 30000, "unitCostUSD": 0.03, "unitLabel": "minute"},
    {"name": "h200", "prettyName": "Nvidia H200", "cpu": "23 vCPU", "ram": "256 GB", "ephemeralStorage": "3000 GB",
     "accelerator": {"type": "gpu", "model": "H200", "quantity": "1", "vram": "141 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 83333, "unitCostUSD": 0.083333, "unitLabel": "minute"},
]
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
LABEL = re.compile(r"[A-Za-z0-9_-]+")
LOG_HOLD_S = 1.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class FakeJob:
    id: str
    namespace: str
    spec: dict[str, Any]
    stages: list[str]
    created_at: str = field(default_factory=_now)
    stage: str = "SCHEDULING"
    reads: int = 0
    logs: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, line)

    def info(self, endpoint: str) -> dict[str, Any]:
        return {
            "id": self.id, "createdAt": self.created_at, "dockerImage": self.spec.get("dockerImage"),
            "spaceId": self.spec.get("spaceId"), "command": self.spec.get("command"), "arguments": [],
            "environment": self.spec.get("environment", {}),
            # The Hub never returns secret values.
            "secrets": dict.fromkeys(self.spec.get("secrets") or {}),
            "flavor": self.spec.get("flavor"), "labels": self.spec.get("labels"),
            "status": {"stage": self.stage, "message": None},
            "owner": {"id": "0" * 24, "name": self.namespace, "type": "user"},
        }


class HubJobs:
    """Plug into a HubServer with `HubJobs(HUB).install()`; `reset()` between tests."""

    def __init__(self, server: HubServer, users: dict[str, str] | None = None) -> None:
        self.server = server
        self.users = dict(users or {})  # token -> user name
        self.jobs: dict[str, FakeJob] = {}
        self.created: list[dict[str, Any]] = []  # job specs as received
        self.progression = ["SCHEDULING", "RUNNING", "RUNNING", "COMPLETED"]
        self.final_stage = "COMPLETED"
        self.hardware = [dict(flavor) for flavor in HARDWARE]  # what /api/jobs/hardware lists and run_job accepts
        self.drop_hardware_requests = False  # close the connection of a hardware request without an answer
        self.log_hold_s = LOG_HOLD_S
        self.lock = threading.Lock()

    def install(self) -> HubJobs:
        """Add the routes, and the users' tokens where the server keeps its own (its whoami answers first)."""
        if self.route not in self.server.state.extra_routes:
            self.server.state.extra_routes.append(self.route)
        tokens = getattr(self.server.state, "tokens", None)
        if isinstance(tokens, dict):
            tokens.update(self.users)
        return self

    def uninstall(self) -> None:
        if self.route in self.server.state.extra_routes:
            self.server.state.extra_routes.remove(self.route)
        tokens = getattr(self.server.state, "tokens", None)
        if isinstance(tokens, dict):
            for token in self.users:
                tokens.pop(token, None)

    def reset(self) -> None:
        with self.lock:
            self.jobs.clear()
            self.created.clear()
            self.progression = ["SCHEDULING", "RUNNING", "RUNNING", "COMPLETED"]
            self.hardware = [dict(flavor) for flavor in HARDWARE]
            self.drop_hardware_requests = False
            self.log_hold_s = LOG_HOLD_S

    # -- routing -----------------------------------------------------------------------------
    def route(self, handler: Any) -> bool:
        url = urlparse(handler.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/api/whoami-v2" and handler.command == "GET":
            return self._whoami(handler)
        if path == "/api/jobs/hardware" and handler.command == "GET":
            if self.drop_hardware_requests:
                handler.close_connection = True
            else:
                handler.send_json(self.hardware)
            return True
        match = re.fullmatch(r"/api/jobs/([^/]+)(?:/([^/]+)(?:/(logs|cancel))?)?", path)
        if not match:
            return False
        namespace, job_id, action = match.groups()
        user = self._user(handler)
        if user is None:
            handler._error(401, "Invalid credentials in Authorization header")
            return True
        if user != namespace:
            handler._error(403, f"{user} cannot use the namespace {namespace}")
            return True
        if job_id is None:
            return self._create(handler, namespace) if handler.command == "POST" else self._list(handler, namespace,
                                                                                                   query)
        job = self.jobs.get(job_id)
        if job is None or job.namespace != namespace:
            handler._error(404, "Job not found")
            return True
        if action == "logs":
            return self._logs(handler, job, query)
        if action == "cancel" and handler.command == "POST":
            with self.lock:
                if job.stage not in TERMINAL:
                    job.stage = "CANCELED"
            handler.send_json({})
            return True
        handler.send_json(self._read(job))
        return True

    def _user(self, handler: Any) -> str | None:
        auth = handler.headers.get("Authorization", "")
        return self.users.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    def _whoami(self, handler: Any) -> bool:
        user = self._user(handler)
        if user is None:
            handler._error(401, "Invalid credentials in Authorization header")
            return True
        handler.send_json({"type": "user", "name": user, "fullname": user.title(), "email": f"{user}@example.org",
                            "avatarUrl": "", "orgs": [], "auth": {"type": "access_token"}})
        return True

    def _body(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(handler.read_body() or b"{}")
        return data

    # -- jobs --------------------------------------------------------------------------------
    def _create(self, handler: Any, namespace: str) -> bool:
        spec = self._body(handler)
        refusal = self._refusal(spec)
        if refusal:
            handler._error(400, refusal)
            return True
        job = FakeJob(id=uuid.uuid4().hex[:24], namespace=namespace, spec=spec, stages=list(self.progression))
        with self.lock:
            self.created.append(spec)
            self.jobs[job.id] = job
            self._log(job, f"===== Job started at {job.created_at} =====")
        handler.send_json(job.info(self.server.url))
        return True

    def _refusal(self, spec: dict[str, Any]) -> str | None:
        flavor = spec.get("flavor")
        if flavor not in {offered["name"] for offered in self.hardware}:
            return f"Invalid flavor {flavor!r}: not an available hardware flavor"
        for key, value in (spec.get("labels") or {}).items():
            if not LABEL.fullmatch(key) or not LABEL.fullmatch(value):
                return (f"Invalid label {key}={value}: label keys and values allow only alphanumerics, "
                        "`-` and `_`")
        return None

    def _list(self, handler: Any, namespace: str, query: dict[str, list[str]]) -> bool:
        stages = set(query.get("stage", []))
        labels = dict(item.split("=", 1) for item in query.get("label", []))
        found = [job.info(self.server.url) for job in self.jobs.values() if job.namespace == namespace
                 and (not stages or job.stage in stages)
                 and all((job.spec.get("labels") or {}).get(k) == v for k, v in labels.items())]
        handler.send_json(found)
        return True

    def _log(self, job: FakeJob, line: str) -> None:
        job.logs.append((_now(), line))

    def _read(self, job: FakeJob) -> dict[str, Any]:
        """Each status read moves a live job one step along its progression and prints what the job would."""
        with self.lock:
            if job.stage not in TERMINAL:
                job.reads += 1
                previous, job.stage = job.stage, job.stages[min(job.reads, len(job.stages) - 1)]
                command = job.spec.get("command") or []
                if job.stage == previous:
                    pass
                elif job.stage == "RUNNING":
                    self._log(job, f"INFO resolve: started ({command[1] if len(command) > 1 else '?'})")
                elif job.stage == "COMPLETED":
                    self._log(job, "INFO verify: every tensor has the recipe's type")
                    if "--upload" in command:  # the job's last line: where it uploaded (its default unless named)
                        repo = (command[command.index("--output-repo") + 1] if "--output-repo" in command
                                else f"{job.namespace}/{command[1].split('/')[1]}-UD-GGUF")
                        self._log(job, f"{self.server.url}/{repo}")
                elif job.stage == "ERROR":
                    self._log(job, "ERROR quantize failed")
            return job.info(self.server.url)

    def _logs(self, handler: Any, job: FakeJob, query: dict[str, list[str]]) -> bool:
        with self.lock:
            events = list(job.logs)
            running = job.stage not in TERMINAL
        if "tail" in query:
            events = events[-int(query["tail"][0]):]
        body = "".join(f"data: {json.dumps({'timestamp': ts, 'data': line})}\n\n" for ts, line in events).encode()
        if not running:
            handler.send_body(200, body, "text/event-stream")
            return True
        # A running job's stream stays open for lines to come: the lines so far, a wait, then its end.
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        if body:
            handler.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
        handler.wfile.flush()
        time.sleep(self.log_hold_s)
        handler.wfile.write(b"0\r\n\r\n")
        return True
