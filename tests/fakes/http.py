"""What every fake HTTP API here shares: HTTP/1.1 with a true Content-Length, JSON in and out, no logs."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar


class JSONHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_headers: ClassVar[dict[str, str]] = {}  # sent with every response (e.g. Docker's Api-Version)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def send_body(self, status: int, body: bytes = b"", content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**self.default_headers, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_body(status, json.dumps(payload).encode(), headers=headers)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""
