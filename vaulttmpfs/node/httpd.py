"""The agent's small HTTP listeners (health, metrics): connections bounded, served from a daemon thread."""

from __future__ import annotations

import socket
import threading
import time
from http.server import ThreadingHTTPServer

from ..errors import DriverError

# Probes and scrapes are one short request each. Connections beyond MAX_CONNECTIONS are closed at
# once, and any connection is cut after MAX_SECONDS, so idle or half-sent requests cannot pile up threads.
MAX_CONNECTIONS = 16
IDLE_SECONDS = 2.0
MAX_SECONDS = 5.0
EXAMPLE_ADDR = "127.0.0.1:9829"  # health.DEFAULT_HEALTH_ADDR


def serve_http(addr: str, handler, what: str):
    """(server, thread): `handler` on host:port `addr`, connections bounded, served from a daemon thread."""
    host, port = parse_addr(addr)
    try:
        server = bounded_server(ThreadingHTTPServer, handler, (host, port))
    except OSError as exc:
        raise DriverError(f"{what} cannot listen on {addr}: {exc.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, args=(0.25,), name=what, daemon=True)
    thread.start()
    return server, thread


def bounded_server(base, handler, address):
    """`base` (a threading HTTP server) serving `handler` at `address`, with bounded connections."""

    class Bounded(base):
        daemon_threads = True
        request_queue_size = 64  # a burst is accepted (and refused past the limit) rather than left in SYN

        def limits(self, max_connections: int, max_seconds: float) -> None:
            self._slots = threading.BoundedSemaphore(max_connections)
            self._max_seconds = max_seconds
            self._open: dict = {}
            self._open_lock = threading.Lock()

        def process_request(self, request, client_address):
            if not self._slots.acquire(blocking=False):
                self.shutdown_request(request)  # full: refuse rather than queue a thread
                return
            with self._open_lock:
                self._open[request] = time.monotonic()
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._done(request)
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._done(request)

        def _done(self, request) -> None:
            with self._open_lock:
                if self._open.pop(request, None) is None:
                    return
            self._slots.release()

        def service_actions(self) -> None:
            # Runs between polls of serve_forever: a connection past its time is cut (its thread's
            # read returns at once and the thread ends).
            now = time.monotonic()
            with self._open_lock:
                late = [conn for conn, since in self._open.items() if now - since > self._max_seconds]
            for conn in late:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    handler.timeout = IDLE_SECONDS  # per read: a silent connection is dropped this soon
    server = Bounded(address, handler)
    server.limits(MAX_CONNECTIONS, MAX_SECONDS)
    return server


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise DriverError(f"health address {addr!r} must be host:port (e.g. {EXAMPLE_ADDR})")
    return host.strip("[]") or "0.0.0.0", int(port)
