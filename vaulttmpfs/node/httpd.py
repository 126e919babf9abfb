"""The agent's small HTTP listeners (health, metrics), which no client can crowd the probes out of.

One thread accepts connections and reads their request heads without blocking (a selector): a
connection still sending costs a small buffer, not a thread. A complete head goes to a few worker
threads, which answer it. When every slot is taken, the oldest connection that has not sent a
complete request is dropped for the newcomer: the kubelet's probe sends its request at once, so any
number of idle or byte-by-byte connections (from any node user, or a pod for /metrics) cannot keep
it out, and threads and memory stay bounded.
"""

from __future__ import annotations

import io
import queue
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import HTTPServer

from ..errors import DriverError

MAX_CONNECTIONS = 64  # open at once: still sending, waiting for a worker, or being answered
WORKERS = 4  # threads answering complete requests (a probe or a scrape takes milliseconds)
MAX_HEAD_BYTES = 16 * 1024  # request line and headers; probes and scrapes send a few hundred
HEAD_SECONDS = 5.0  # to send the request head, however slowly
IDLE_SECONDS = 2.0  # per read or write while answering
# Fewer than MAX_CONNECTIONS: a connection just accepted has its request read before newcomers can
# push it out, however fast they come.
ACCEPTS_PER_ROUND = 8
HEAD_END = re.compile(rb"\r?\n\r?\n")
EXAMPLE_ADDR = "127.0.0.1:9829"  # health.DEFAULT_HEALTH_ADDR


def serve_http(addr: str, handler, what: str):
    """(server, thread): `handler` on host:port `addr`, connections bounded, served from a daemon thread."""
    host, port = parse_addr(addr)
    try:
        server = BoundedHTTPServer((host, port), handler, what)
    except OSError as exc:
        raise DriverError(f"{what} cannot listen on {addr}: {exc.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, args=(0.25,), name=what, daemon=True)
    thread.start()
    return server, thread


@dataclass
class Arriving:
    """A connection still sending its request head."""

    since: float
    address: tuple
    head: bytearray = field(default_factory=bytearray)


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer whose connections are bounded and cannot hold each other out (see the module's doc)."""

    request_queue_size = 64  # a burst waits in the kernel's accept queue (taken 8 a round), not dropped

    def __init__(self, address, handler, what: str = "http server"):
        super().__init__(address, replaying(handler))
        self.what = what
        self._arriving: dict[socket.socket, Arriving] = {}  # oldest first
        self._answering = 0  # handed to the workers, not yet closed
        self._answering_lock = threading.Lock()
        self._complete: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.25) -> None:
        workers = [threading.Thread(target=self._answer_complete, name=f"{self.what} worker", daemon=True)
                   for _ in range(WORKERS)]
        for worker in workers:
            worker.start()
        self.socket.setblocking(False)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    self._round(selector, poll_interval)
                for conn in list(self._arriving):
                    self._drop(selector, conn)
        finally:
            for _ in workers:
                self._complete.put(None)
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._stopped.wait()

    def _round(self, selector, poll_interval: float) -> None:
        ready = {key.fileobj for key, _events in selector.select(poll_interval)}
        # Reads first: a connection whose request is in cannot be the one a newcomer evicts.
        for conn in ready - {self.socket}:
            self._read_head(selector, conn)
        if self.socket in ready:
            self._accept(selector)
        self._drop_slow(selector)

    def _accept(self, selector) -> None:
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                conn, address = self.socket.accept()
            except OSError:  # none left (EAGAIN), or out of descriptors: the next round tries again
                return
            if self._open() >= MAX_CONNECTIONS and not self._evict_oldest_arriving(selector):
                conn.close()  # every slot holds a complete request: they are answered in moments
                continue
            conn.setblocking(False)
            self._arriving[conn] = Arriving(time.monotonic(), address)
            selector.register(conn, selectors.EVENT_READ)

    def _read_head(self, selector, conn: socket.socket) -> None:
        arriving = self._arriving[conn]
        try:
            chunk = conn.recv(MAX_HEAD_BYTES + 1 - len(arriving.head))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        searched = max(0, len(arriving.head) - 3)  # the end may straddle chunks; no rescan of the rest
        arriving.head += chunk
        if not chunk or len(arriving.head) > MAX_HEAD_BYTES:
            self._drop(selector, conn)  # gone, or no probe nor scrape
        elif HEAD_END.search(arriving.head, searched):
            self._hand_over(selector, conn)

    def _hand_over(self, selector, conn: socket.socket) -> None:
        selector.unregister(conn)
        arriving = self._arriving.pop(conn)
        with self._answering_lock:
            self._answering += 1
        self._complete.put((conn, arriving.address, bytes(arriving.head)))

    def _evict_oldest_arriving(self, selector) -> bool:
        if not self._arriving:
            return False
        self._drop(selector, next(iter(self._arriving)))
        return True

    def _drop_slow(self, selector) -> None:
        too_old = time.monotonic() - HEAD_SECONDS
        for conn, arriving in list(self._arriving.items()):
            if arriving.since > too_old:
                return  # the rest came later
            self._drop(selector, conn)

    def _drop(self, selector, conn: socket.socket) -> None:
        selector.unregister(conn)
        del self._arriving[conn]
        conn.close()

    def _open(self) -> int:
        return len(self._arriving) + self._answering

    def _answer_complete(self) -> None:
        while (job := self._complete.get()) is not None:
            conn, address, head = job
            try:
                conn.setblocking(True)  # the handler's own timeout applies from here
                self.RequestHandlerClass(conn, address, self, head)
            except Exception:  # noqa: BLE001 -- one bad exchange must not end the worker
                self.handle_error(conn, address)
            finally:
                self.shutdown_request(conn)
                with self._answering_lock:
                    self._answering -= 1


def replaying(handler):
    """`handler`, given first the request head the server has already read off the socket."""

    class Replaying(handler):
        timeout = IDLE_SECONDS  # per read and write: a client that stops reading is cut this soon

        def __init__(self, request, client_address, server, head: bytes):
            self.request_head = head
            super().__init__(request, client_address, server)

        def setup(self) -> None:
            super().setup()
            self.rfile = io.BufferedReader(HeadThenRest(self.request_head, self.rfile))

    return Replaying


class HeadThenRest(io.RawIOBase):
    """A stream of `head`, then of whatever `rest` (the socket's stream) still holds."""

    def __init__(self, head: bytes, rest) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._head:
            return self._rest.readinto(buffer)
        taken = min(len(buffer), len(self._head))
        buffer[:taken] = self._head[:taken]
        self._head = self._head[taken:]
        return taken

    def close(self) -> None:
        self._rest.close()
        super().close()


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise DriverError(f"health address {addr!r} must be host:port (e.g. {EXAMPLE_ADDR})")
    return host.strip("[]") or "0.0.0.0", int(port)
