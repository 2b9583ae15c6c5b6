"""A fake Docker Engine API on a unix socket, for the real docker SDK (DOCKER_HOST=unix://...).

Only what the SDK calls for containers.run / get / list / logs / stop / remove, images.get,
the low-level pull and ping, answered as moby answers them:
  GET  /_ping, /version
  POST /containers/create?name=   (404 "No such image" until the image was pulled)
  POST /containers/{id}/start     (400 with `start_error`, as an engine without the NVIDIA runtime)
  POST /containers/{id}/stop      (304 when it is not running)
  GET  /containers/json?all=&filters=   (label: key, key=value, key!=value, all must match;
                                         status: any may match, and implies all=1)
  GET  /containers/{id}/json, /containers/{id}/logs (multiplexed stdout/stderr frames; 501 with the
                                                     `log_driver` "none", which keeps no log)
  DELETE /containers/{id}         (409 while it runs, unless force=1)
{id} is a container's id or its name, as for the real engine.
  POST /images/create?fromImage=&tag=   a chunked stream of JSON progress entries, quiet for `pull_pause`
                                        seconds before extracting; with `pull_error`, an error entry after
                                        some progress (HTTP 200 already sent, as a pull failing mid-way);
                                        with `pull_cut`, the connection breaks off there instead
  GET  /images/{name}/json
Every request is recorded with its body; tests finish containers with `finish()`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlparse

from tests.fakes.http import JSONHandler

API_VERSION = "1.47"
CONTAINER_STATES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")
LAYERS = ("4f4fb700ef54", "a3ed95caeb02")


def _timestamp() -> str:
    """RFC 3339 with nanoseconds, trailing zeros dropped, as Go's time.RFC3339Nano (the engine's Created)."""
    now = time.time_ns()
    seconds = datetime.fromtimestamp(now // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{now % 1_000_000_000:09d}".rstrip("0")
    return f"{seconds}.{fraction}Z" if fraction else f"{seconds}Z"


def _nanoseconds(created: str) -> int:
    seconds, _, fraction = created.rstrip("Z").partition(".")
    whole = int(datetime.fromisoformat(seconds + "+00:00").timestamp())
    return whole * 1_000_000_000 + int(fraction.ljust(9, "0"))


class EngineState:
    def __init__(self) -> None:
        self.images: set[str] = set()
        self.containers: dict[str, dict[str, Any]] = {}
        self.output: dict[str, list[tuple[int, str]]] = {}  # container id -> (stream 1|2, line)
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        self.start_error: str | None = None
        self.pull_error: str | None = None  # the engine's error text, sent after the first layer's progress
        self.pull_cut = False  # the connection breaks off after the first layer's progress (a network drop)
        self.pull_pause = 0.0  # seconds of quiet before the first layer's extraction (a big layer)
        self.log_driver = "json-file"  # the daemon's default; "none" keeps no log to read
        self.lock = threading.Lock()


class _Handler(JSONHandler):
    state: EngineState
    default_headers: ClassVar[dict[str, str]] = {"Api-Version": API_VERSION}

    def address_string(self) -> str:  # unix sockets have no peer address
        return "unix"

    def _message(self, status: int, message: str) -> None:
        self.send_json({"message": message}, status)

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlparse(self.path)
        path = re.sub(r"^/v\d+\.\d+", "", url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        raw = self.read_body()
        body = json.loads(raw) if raw.strip().startswith(b"{") else None
        with self.state.lock:
            self.state.requests.append((self.command, path + (f"?{url.query}" if url.query else ""), body))
        if path == "/_ping":
            return self.send_body(200, b"OK", "text/plain")
        if path == "/version":
            return self.send_json({"ApiVersion": API_VERSION, "MinAPIVersion": "1.24", "Version": "27.3.1",
                               "Os": "linux", "Arch": "amd64"})
        if path == "/containers/create" and self.command == "POST":
            return self._create(body or {}, query.get("name", ""))
        if path == "/containers/json" and self.command == "GET":
            return self._list(query)
        if match := re.fullmatch(r"/containers/([^/]+)", path):
            if self.command != "DELETE":
                return self._message(405, "no")
            return self._remove(self._id(match.group(1)), force=query.get("force") in ("1", "True", "true"))
        if match := re.fullmatch(r"/containers/([^/]+)/(json|start|stop|logs)", path):
            return self._container(self._id(match.group(1)), match.group(2), query)
        if path == "/images/create" and self.command == "POST":
            return self._pull(query.get("fromImage", ""), query.get("tag", "latest"))
        if match := re.fullmatch(r"/images/(.+)/json", path):
            name = unquote(match.group(1))
            if name not in self.state.images:
                return self._message(404, f"No such image: {name}")
            return self.send_json({"Id": "sha256:" + "0" * 64, "RepoTags": [name]})
        self._message(404, f"page not found: {self.command} {path}")

    def _id(self, ref: str) -> str:
        by_name = [cid for cid, c in self.state.containers.items() if c["Name"] == f"/{ref}"]
        return by_name[0] if by_name else ref

    def _create(self, body: dict[str, Any], name: str) -> None:
        image = body.get("Image", "")
        if image not in self.state.images:
            return self._message(404, f"No such image: {image}")
        container_id = uuid.uuid4().hex + uuid.uuid4().hex
        host_config = body.get("HostConfig") or {}
        if not (host_config.get("LogConfig") or {}).get("Type"):
            host_config["LogConfig"] = {"Type": self.state.log_driver, "Config": {}}
        with self.state.lock:
            self.state.containers[container_id] = {
                "Id": container_id, "Name": f"/{name}", "Image": image, "Created": _timestamp(),
                "Config": {"Image": image, "Cmd": body.get("Cmd"), "Entrypoint": body.get("Entrypoint"),
                           "Env": body.get("Env"), "Labels": body.get("Labels") or {}, "Tty": bool(body.get("Tty"))},
                "HostConfig": host_config,
                "State": {"Status": "created", "Running": False, "ExitCode": 0},
            }
            self.state.output[container_id] = []
        self.send_json({"Id": container_id, "Warnings": []}, 201)

    def _list(self, query: dict[str, str]) -> None:
        filters: dict[str, list[str]] = json.loads(query.get("filters") or "{}")
        for key, values in filters.items():
            if key not in ("label", "status"):
                return self._message(400, f"invalid filter '{key}'")
            for value in values if key == "status" else ():
                if value not in CONTAINER_STATES:
                    return self._message(400, f"invalid filter 'status={value}'")
        statuses = filters.get("status", [])
        every = query.get("all") in ("1", "True", "true") or bool(statuses)
        with self.state.lock:
            listed = [c for c in self.state.containers.values()
                      if (every or c["State"]["Status"] == "running")
                      and (not statuses or c["State"]["Status"] in statuses)
                      and all(_label_matches(c["Config"]["Labels"], wanted) for wanted in filters.get("label", []))]
            summaries = [{"Id": c["Id"], "Names": [c["Name"]], "Image": c["Image"],
                          "Command": " ".join((c["Config"]["Entrypoint"] or []) + (c["Config"]["Cmd"] or [])),
                          "Created": _nanoseconds(c["Created"]) // 1_000_000_000,
                          "Labels": c["Config"]["Labels"], "State": c["State"]["Status"],
                          "Status": c["State"]["Status"]} for c in listed]
            summaries.sort(key=lambda s: _nanoseconds(self.state.containers[s["Id"]]["Created"]), reverse=True)
        self.send_json(summaries)  # newest first, as `docker ps`

    def _container(self, container_id: str, action: str, query: dict[str, str]) -> None:
        container = self.state.containers.get(container_id)
        if container is None:
            return self._message(404, f"No such container: {container_id}")
        if action == "json":
            return self.send_json(container)
        if action == "start":
            if self.state.start_error:  # moby's InvalidParameter, e.g. no device driver for --gpus
                return self._message(400, self.state.start_error)
            with self.state.lock:
                container["State"] = {"Status": "running", "Running": True, "ExitCode": 0}
                self.state.output[container_id].append((2, "INFO resolve: started"))
            return self.send_body(204)
        if action == "stop":
            if not container["State"]["Running"]:
                return self.send_body(304)  # not modified: it had stopped already
            with self.state.lock:
                container["State"] = {"Status": "exited", "Running": False, "ExitCode": 143,
                                      "FinishedAt": _timestamp()}
                if container["HostConfig"].get("AutoRemove"):
                    del self.state.containers[container_id]
            return self.send_body(204)
        if container["HostConfig"]["LogConfig"]["Type"] == "none":
            return self._message(501, "configured logging driver does not support reading")
        lines = self.state.output[container_id]
        wanted = {1} if query.get("stdout") in ("1", "True", "true") else set()
        wanted |= {2} if query.get("stderr") in ("1", "True", "true") else set()
        tail = query.get("tail", "all")
        selected = [(stream, line) for stream, line in lines if stream in wanted]
        if tail != "all":
            selected = selected[-int(tail):] if int(tail) else []
        frames = b"".join(struct.pack(">BxxxL", stream, len(data)) + data
                          for stream, data in ((s, (line + "\n").encode()) for s, line in selected))
        self.send_body(200, frames, "application/vnd.docker.multiplexed-stream")

    def _remove(self, container_id: str, force: bool) -> None:
        with self.state.lock:
            container = self.state.containers.get(container_id)
            if container is None:
                return self._message(404, f"No such container: {container_id}")
            if container["State"]["Running"] and not force:
                return self._message(409, f"cannot remove container {container_id}: container is running")
            del self.state.containers[container_id]
        self.send_body(204)

    def _pull(self, image: str, tag: str) -> None:
        """As the engine: 200 at once, then one JSON entry per chunk; a failure after that is an entry too."""
        layer, other = LAYERS
        entries: list[dict[str, Any]] = [
            {"status": f"Pulling from {image.split('/', 1)[-1]}", "id": tag},
            {"status": "Pulling fs layer", "progressDetail": {}, "id": layer},
            {"status": "Pulling fs layer", "progressDetail": {}, "id": other},
            {"status": "Downloading", "progressDetail": {"current": 512, "total": 1024},
             "progress": "[=========================>                         ]     512B/1.024kB", "id": layer},
        ]
        if self.state.pull_cut:
            pass
        elif self.state.pull_error:
            entries.append({"errorDetail": {"message": self.state.pull_error}, "error": self.state.pull_error})
        else:
            for done in (layer, other):
                entries += [{"status": "Download complete", "progressDetail": {}, "id": done},
                            {"status": "Extracting", "progressDetail": {"current": 1024, "total": 1024}, "id": done},
                            {"status": "Pull complete", "progressDetail": {}, "id": done}]
            entries += [{"status": "Digest: sha256:" + "1" * 64},
                        {"status": f"Status: Downloaded newer image for {image}:{tag}"}]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        for key, value in self.default_headers.items():
            self.send_header(key, value)
        self.end_headers()
        quiet = self.state.pull_pause
        for entry in entries:
            if quiet and entry.get("status") == "Extracting":  # the engine sends nothing while it unpacks
                time.sleep(quiet)
                quiet = 0.0
            data = json.dumps(entry).encode() + b"\r\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        if self.state.pull_cut:  # no last chunk: the client sees the stream end early
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(b"0\r\n\r\n")
        if not self.state.pull_error:
            with self.state.lock:
                self.state.images.add(f"{image}:{tag}")


def _label_matches(labels: dict[str, str], wanted: str) -> bool:
    """moby's label filter: `key` (present), `key=value` or `key!=value`."""
    if "!=" in wanted:
        key, value = wanted.split("!=", 1)
        return labels.get(key) != value
    if "=" in wanted:
        key, value = wanted.split("=", 1)
        return key in labels and labels[key] == value
    return wanted in labels


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End the kept-alive connections too, as a stopped engine does."""
        for connection in list(self.open_connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class FakeDockerEngine:
    """`with FakeDockerEngine() as engine:` serves on engine.socket_path; engine.docker_host for DOCKER_HOST."""

    def __init__(self) -> None:
        self.state = EngineState()
        self._dir = tempfile.mkdtemp(prefix="fake-docker-")
        self.socket_path = Path(self._dir) / "docker.sock"
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = _Server(str(self.socket_path), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> FakeDockerEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and remove the socket (a test may stop the engine before its fixture does)."""
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self.socket_path.unlink(missing_ok=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FakeDockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def finish(self, container_id: str, exit_code: int, stdout: Sequence[str] = (), stderr: Sequence[str] = (),
               oom_killed: bool = False) -> None:
        """End a running container as the job would: stderr lines, then stdout (its last line the URL)."""
        with self.state.lock:
            output = self.state.output[container_id]
            output += [(2, line) for line in stderr] + [(1, line) for line in stdout]
            self.state.containers[container_id]["State"] = {"Status": "exited", "Running": False,
                                                            "ExitCode": exit_code, "OOMKilled": oom_killed,
                                                            "FinishedAt": _timestamp()}
            if self.state.containers[container_id]["HostConfig"].get("AutoRemove"):  # as the engine does
                del self.state.containers[container_id]
