"""A small Hugging Face Hub-compatible server for tests, driven by the real huggingface_hub client.

It serves repos held in memory or on disk: model info, tree listing, paths-info, file
HEAD/GET with true Content-Length, ETag, X-Repo-Commit and range reads, and counts the
bytes it serves per file. Start it with `HubServer().start()`, point HF_ENDPOINT at
`server.url` before huggingface_hub is imported (tests/e2e/conftest.py does).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tests.fakes.http import JSONHandler

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class RepoFile:
    path: Path | None = None  # content on disk (large, possibly sparse) ...
    data: bytes = b""  # ... or in memory

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path else len(self.data)

    def read(self, start: int, end: int) -> bytes:
        if self.path is None:
            return self.data[start:end]
        with self.path.open("rb") as f:
            f.seek(start)
            return f.read(end - start)

    @property
    def oid(self) -> str:
        if self.path is None:  # what git (and the Hub) calls the blob id
            return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()
        stat = self.path.stat()
        return hashlib.sha1(f"{self.path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, RepoFile] = field(default_factory=dict)
    sha: str = ""
    gated: bool = False
    private: bool = False
    card_data: dict[str, Any] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)  # uploads received: header + paths

    def commit(self) -> None:
        digest = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + self.files[name].oid.encode())
        self.sha = digest.hexdigest()


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: dict[str, int] = defaultdict(int)  # "repo/path" -> bytes sent
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers
        self.tokens = {"hf_test_token_owner": "tester"}  # accepted tokens -> user name
        self.read_only_tokens: set[str] = set()  # tokens whose role is "read": no repo creation, no commits
        self.orgs: dict[str, list[str]] = {}  # user -> the organizations it belongs to
        self.read_only_orgs: set[str] = set()  # organizations whose members here have the read role only
        # Fine-grained tokens -> their scoped permissions, as whoami-v2 lists them:
        # [{"entity": {"type": "user" | "org" | "model", "name": ...}, "permissions": ["repo.write", ...]}]
        self.fine_grained: dict[str, list[dict[str, Any]]] = {}
        # Cut the connection after N bytes, once, for these "repo/path" downloads.
        self.interrupt_once: dict[str, int] = {}
        # More endpoints (jobs, uploads) plug in here: each returns True when it answered.
        self.extra_routes: list[Callable[[Any], bool]] = []
        self.lock = threading.Lock()

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], **kwargs: Any) -> Repo:
        repo = Repo(repo_id, {name: RepoFile(path=v) if isinstance(v, Path) else RepoFile(data=v)
                              for name, v in files.items()}, **kwargs)
        repo.commit()
        self.repos[repo_id] = repo
        return repo


class _Handler(JSONHandler):
    state: HubState

    # -- plumbing ---------------------------------------------------------------------------
    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self.send_json({"error": message}, status, headers)

    def _token(self) -> str:
        return self.headers.get("Authorization", "").removeprefix("Bearer ").strip()

    def _user(self) -> str | None:
        return self.state.tokens.get(self._token())

    def _may_write(self, repo_id: str) -> bool:
        """Answer the error unless the request carries a valid token with write access to the repo's namespace."""
        user = self._user()
        if user is None:
            self._error(401, "Invalid credentials")
            return False
        namespace = repo_id.split("/")[0]
        writable = [org for org in self.state.orgs.get(user, []) if org not in self.state.read_only_orgs]
        if self._token() in self.state.read_only_tokens or namespace not in (user, *writable):
            self._error(403, "You don't have the rights to write to this namespace")
            return False
        scoped = self.state.fine_grained.get(self._token())
        if scoped is not None:
            # Repos are created with write access to their namespace; a repo scope writes only that repo.
            granted = {(s["entity"].get("type"), s["entity"].get("name")) for s in scoped
                       if "repo.write" in s["permissions"]}
            if any(name is None for _, name in granted):  # named only by id: this server cannot tell, it allows
                return True
            kind = "user" if namespace == user else "org"
            in_repo = ("model", repo_id) in granted and repo_id in self.state.repos
            if (kind, namespace) not in granted and not in_repo:
                self._error(403, "This fine-grained token does not have the permission to write to this repo")
                return False
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and user is None):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if repo.gated and user is None:
            self._error(401, "Access to this model is restricted", "GatedRepo")
            return None
        return repo

    def _json_body(self) -> Any:
        return json.loads(self.read_body() or b"{}")

    def _check_revision(self, repo: Repo, revision: str) -> bool:
        if unquote(revision) not in ("main", repo.sha):
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return False
        return True

    # -- routes ------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlparse(self.path)
        path = url.path
        with self.state.lock:
            self.state.requests.append((self.command, path, dict(self.headers)))
        if path == "/api/validate-yaml" and self.command == "POST":
            import yaml

            content = self._json_body().get("content", "")
            try:
                yaml.safe_load(content.split("---")[1] if content.startswith("---") else "{}")
            except yaml.YAMLError as err:
                return self._error(400, f"invalid YAML in the card: {err}")
            return self.send_json({"errors": [], "warnings": []})
        if path == "/api/whoami-v2":
            return self._whoami()
        if path == "/api/repos/create" and self.command == "POST":
            return self._create_repo()
        if path == "/api/models" and self.command == "GET":
            return self._list_models(url.query)
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            return self._preupload(match.group(1))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            return self._commit(match.group(1))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._model_info(match.group(1), match.group(2) or "main")
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._tree(match.group(1), match.group(2), (match.group(3) or "").strip("/"))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path):
            return self._paths_info(match.group(1), match.group(2))
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._file(match.group(1), match.group(2), unquote(match.group(3)))
        for route in self.state.extra_routes:
            if route(self):
                return
        self._error(404, f"no route for {self.command} {path}")

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return
        orgs = [{"type": "org", "name": org, "roleInOrg": "read" if org in self.state.read_only_orgs else "write"}
                for org in self.state.orgs.get(user, [])]
        token: dict[str, Any] = {"role": "read" if self._token() in self.state.read_only_tokens else "write",
                                 "displayName": "t"}
        if (scoped := self.state.fine_grained.get(self._token())) is not None:
            token = {"role": "fineGrained", "displayName": "t",
                     "fineGrained": {"global": [], "scoped": scoped, "canReadGatedRepos": False}}
        self.send_json({"type": "user", "name": user, "fullname": user, "orgs": orgs,
                        "auth": {"type": "access_token", "accessToken": token}})

    def _create_repo(self) -> None:
        user = self._user()
        body = self._json_body()
        repo_id = f"{body.get('organization') or user}/{body['name']}"
        if not self._may_write(repo_id):
            return
        host, port = self.server.server_address[:2]
        if repo_id in self.state.repos:  # the Hub's 409 carries the url too
            self.send_json({"error": "You already created this model repo", "url": f"http://{host}:{port}/{repo_id}"},
                            409, {"X-Error-Message": "You already created this model repo"})
            return
        repo = Repo(repo_id, private=bool(body.get("private")))
        repo.commit()
        self.state.repos[repo_id] = repo
        self.send_json({"url": f"http://{host}:{port}/{repo_id}", "name": repo_id, "id": repo_id})

    def _list_models(self, query: str) -> None:
        from urllib.parse import parse_qs

        wanted = parse_qs(query).get("filter", [])
        found = []
        for repo in self.state.repos.values():
            base = repo.card_data.get("base_model")
            bases = base if isinstance(base, list) else [base]
            tags = {f"base_model:{b}" for b in bases if b}
            tags |= {f"base_model:{repo.card_data.get('base_model_relation')}:{b}" for b in bases if b}
            if all(w in tags for w in wanted) and not repo.private:
                found.append({"_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id,
                              "tags": sorted(tags), "private": False})
        self.send_json(found)

    def _writable_repo(self, repo_id: str) -> Repo | None:
        """The repo, when it exists and the request carries a valid token; else answer the error."""
        repo = self._repo(repo_id)
        if repo is not None and not self._may_write(repo_id):
            return None
        return repo

    def _preupload(self, repo_id: str) -> None:
        if self._writable_repo(repo_id) is None:
            return
        files = self._json_body().get("files", [])
        self.send_json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]})

    def _commit(self, repo_id: str) -> None:
        import base64

        repo = self._writable_repo(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in self.read_body().decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        paths = []
        for line in lines:
            if line["key"] == "file":
                repo.files[line["value"]["path"]] = RepoFile(data=base64.b64decode(line["value"]["content"]))
                paths.append(line["value"]["path"])
            elif line["key"] == "deletedFile":
                repo.files.pop(line["value"]["path"], None)
        repo.commits.append({"summary": header.get("summary"), "paths": paths})
        repo.commit()
        host, port = self.server.server_address[:2]
        self.send_json({"success": True, "commitOid": repo.sha,
                         "commitUrl": f"http://{host}:{port}/{repo_id}/commit/{repo.sha}"})

    def _entry(self, name: str, file: RepoFile) -> dict[str, Any]:
        return {"type": "file", "path": name, "size": file.size, "oid": file.oid}

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._check_revision(repo, revision):
            return
        self.send_json({
            "_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
            "private": repo.private, "gated": "auto" if repo.gated else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "cardData": repo.card_data,
            "lastModified": "2026-11-27T00:00:00.000Z", "createdAt": "2026-11-01T00:00:00.000Z",
            "siblings": [{"rfilename": name, "size": f.size, "blobId": f.oid}
                         for name, f in sorted(repo.files.items())],
        })

    def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._check_revision(repo, revision):
            return
        entries = [self._entry(n, f) for n, f in sorted(repo.files.items()) if not prefix or n.startswith(prefix + "/")]
        self.send_json(entries)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._check_revision(repo, revision):
            return
        raw = self.read_body().decode()
        try:
            wanted = json.loads(raw).get("paths", [])
        except ValueError:
            from urllib.parse import parse_qs

            wanted = parse_qs(raw).get("paths", [])
        self.send_json([self._entry(n, repo.files[n]) for n in wanted if n in repo.files])

    def _file(self, repo_id: str, revision: str, name: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._check_revision(repo, revision):
            return
        file = repo.files.get(name)
        if file is None:
            self._error(404, "Entry not found", "EntryNotFound")
            return
        size = file.size
        start, end, status = 0, size, 200
        if self.command == "GET" and (match := _RANGE.fullmatch(self.headers.get("Range", "").strip())):
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{file.oid}"')
        self.send_header("X-Repo-Commit", repo.sha)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        sent = 0
        key = f"{repo_id}/{name}"
        cut = self.state.interrupt_once.get(key)
        if cut is not None and end - start > cut:  # only a download long enough to be cut
            del self.state.interrupt_once[key]
            self.wfile.write(file.read(start, min(end, start + cut)))
            with self.state.lock:
                self.state.served[key] += min(end - start, cut)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        while start + sent < end:
            chunk = file.read(start + sent, min(end, start + sent + (1 << 20)))
            self.wfile.write(chunk)
            sent += len(chunk)
        with self.state.lock:
            self.state.served[f"{repo_id}/{name}"] += sent


class HubServer:
    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
