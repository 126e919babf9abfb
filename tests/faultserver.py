"""A real HTTP server on loopback in front of a real OpenBao, for the faults a real server will not
produce on demand: a 500, a hang, an answer held back after Vault acted.

Everything not matched by a rule is forwarded to the real server unchanged, so the driver talks
to real Vault semantics except exactly where a test injects a fault. Stdlib only.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CREATE = "/v1/auth/token/create/"
LOOKUP_SELF = "/v1/auth/token/lookup-self"


@dataclass
class Rule:
    path: str  # a request path prefix
    # "error" | "hang" | "hold-answer" | "drip" | "forward-then-error" (Vault acts, the gateway answers
    # `status`) | "strip-wrap-ttl" (forwarded without X-Vault-Wrap-TTL) | "delay" (Vault acts at once, its
    # answer is passed on only when released) | "answer-then-close" (answered as if the connection stays
    # open, then closed: a server or gateway ending an idle kept-alive connection) | "slow" (forwarded
    # after `seconds`: a loaded Vault) | "answer" (answered `status` with `body`, never forwarded: a
    # gateway answering for Vault)
    action: str
    times: int | None = None  # None: every time
    status: int = 500
    seconds: float = 0.0
    body: str = ""


class FaultServer:
    def __init__(self, upstream: str, keep_alive: bool = False):
        """keep_alive: speak HTTP/1.1 and keep connections open between requests (else one per request)."""
        self.upstream = urllib.parse.urlsplit(upstream)
        self.keep_alive = keep_alive
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []
        self.connections: list[tuple[str, int]] = []  # (path, connection number) per request
        self.arrived = threading.Event()  # a hang / hold-answer rule has caught a request
        self.release = threading.Event()  # let held requests go (closed without an answer)
        self.lock = threading.Lock()
        self.writes_in_flight = 0  # POST/PUT requests being handled right now
        self.writes_peak = 0  # ... and the most at once
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.addr = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FaultServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, path: str, action: str, times: int | None = None, status: int = 500, seconds: float = 0.0,
            body: str = "") -> None:
        with self.lock:
            self.rules.append(Rule(path, action, times, status, seconds, body))

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def count(self, path: str, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, p in self.seen if p.startswith(path) and method in (None, m))

    def _take(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.seen.append((method, path))
            for rule in self.rules:
                if path.startswith(rule.path):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times <= 0:
                            self.rules.remove(rule)
                    return rule
        return None

    def forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            keep = {k: v for k, v in headers.items() if k.lower() not in {"host", "connection", "content-length"}}
            conn.request(method, path, body=body or None, headers=keep)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", "application/json"), response.read()
        finally:
            conn.close()


def _handler(server: FaultServer):
    numbers = iter(range(1, 1 << 30))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if server.keep_alive else "HTTP/1.0"

        def log_message(self, *args) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            self.number = next(numbers)

        def _handle(self) -> None:
            # A write is in flight from its arrival until its answer starts going out (the client may send
            # its next one as soon as it has the answer, before this thread is done).
            self.counted = self.command in ("POST", "PUT")
            with server.lock:
                server.writes_in_flight += self.counted
                server.writes_peak = max(server.writes_peak, server.writes_in_flight)
            try:
                self._serve()
            finally:
                self._answered()

        def _answered(self) -> None:
            with server.lock:
                server.writes_in_flight -= self.counted
                self.counted = False

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with server.lock:
                server.connections.append((self.path, self.number))
            rule = server._take(self.command, self.path)
            action = rule.action if rule else "forward"
            if action == "error":
                return self._answer(rule.status, "application/json", b'{"errors":["injected fault"]}')
            if action == "answer":
                kind = "application/json" if rule.body.startswith(("{", "[")) else "text/html"
                return self._answer(rule.status, kind, rule.body.encode())
            if action == "hang":  # never answer; the connection closes when released
                server.arrived.set()
                server.release.wait(120)
                self.close_connection = True
                return None
            headers = self.headers
            if action == "slow":
                time.sleep(rule.seconds)
            if action == "strip-wrap-ttl":
                headers = {k: v for k, v in headers.items() if k.lower() != "x-vault-wrap-ttl"}
            answer = server.forward(self.command, self.path, headers, body)
            if action == "forward-then-error":
                return self._answer(rule.status, "text/html", b"<html>502 Bad Gateway</html>")
            if action == "delay":
                server.arrived.set()
                server.release.wait(120)
                return self._answer(*answer)
            if action == "hold-answer":  # Vault has acted; its answer is held back
                server.arrived.set()
                server.release.wait(120)
                self.close_connection = True
                return None
            if action == "drip":  # headers now, then the body one byte a second
                return self._drip(*answer)
            if action == "answer-then-close":
                self.close_connection = True
            return self._answer(*answer)

        def _answer(self, status: int, content_type: str, data: bytes) -> None:
            self._answered()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _drip(self, status: int, content_type: str, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(len(data)):
                if server.release.wait(1.0):
                    return
                try:
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return

        do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _handle  # noqa: N815 -- http.server's naming

    return Handler


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
