"""GET /healthz and /livez: the agent's services' health, for the kubelet's probes and `vaulttmpfs doctor`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Callable

from .httpd import serve_http
from .service import Service

DEFAULT_HEALTH_ADDR = "127.0.0.1:9829"


class HealthServer(Service):
    """GET /healthz: 200 when every service is healthy, else 503. GET /livez: 200 while loops run.

    The JSON body carries states and errors, never a token.
    """

    name = "health"

    def __init__(self, addr: str, report: Callable[[], tuple[bool, bool, dict]]):
        self.addr = addr
        self.report = report
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        report = self.report

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path not in ("/healthz", "/livez"):
                    return self._send(404, {"error": "not found; try /healthz or /livez"})
                healthy, alive, body = report()
                ok = healthy if path == "/healthz" else alive
                self._send(200 if ok else 503, {"status": "ok" if ok else "failing", **body})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body, sort_keys=True).encode() + b"\n"
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args):  # probes every few seconds: not worth a log line each
                pass

        self._server, self._thread = serve_http(self.addr, Handler, "health server")

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())
