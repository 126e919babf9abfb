"""The agent's half of the FlexVolume relay: takes a driver call over the unix socket and runs it here.

The protocol (banner, commit point, frames) is described in `flexvolume.relay`, which also holds the
wire format both halves share.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time

from .. import log, telemetry
from ..errors import DriverError
from ..flexvolume import protocol
from ..flexvolume.relay import BANNER, MAX_FRAME, Refused, _connect, decode_request, encode_reply
from .service import Family, Service


def handle_call(argv: list[str], env: dict[str, str]) -> tuple[bytes, int]:
    """Run one kubelet call in this process, as the driver would with the caller's settings."""
    telemetry.begin()
    started = time.monotonic()
    settings = protocol.load_settings(env)  # the caller's, not the agent's; the log stays the agent's
    payload, code = protocol.encode(protocol.handle(argv, settings))
    if argv and argv[0] in ("mount", "unmount"):
        telemetry.finish(argv[0], code == 0, time.monotonic() - started, settings[0].state_dir, via="relay")
    return payload, code


class RelayServer(Service):
    """Serves the socket for the agent."""

    name = "relay"
    banner = BANNER
    MAX_INFLIGHT = 128  # past this, callers wait for the banner and then do the work themselves
    REQUEST_TIMEOUT = 10.0
    STOP_GRACE = 120.0  # a call in flight is finished, not cut: a half-done mount helps nobody

    def __init__(self, config, handler=handle_call, path: str | None = None):
        self.config = config
        self.path = path or config.agent_socket
        self.handler = handler
        self.counts = {"relayed": 0, "refused": 0, "dropped": 0, "failed": 0}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.MAX_INFLIGHT)
        self._stopping = threading.Event()
        self._workers: set = set()
        self._sock = None
        self._inode = None
        self._thread = None

    def start(self) -> None:
        self._sock, self._inode = _listen(self.path, self.banner)
        self._thread = threading.Thread(target=self._accept_loop, name=self.name, daemon=True)
        self._thread.start()
        log.get(component=self.name).info(f"{self.name} listening", socket=self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread:
            self._thread.join(5)
        _unlink_if_ours(self.path, self._inode)
        for worker in list(self._workers):
            worker.join(self.STOP_GRACE)

    def status(self) -> dict:
        with self._lock:
            return {**self.counts, "socket": self.path, "in_flight": len(self._workers)}

    def healthy(self) -> bool:
        return self.alive()

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def metric_families(self) -> list[Family]:
        status = self.status()
        return [Family("counter", f"vaulttmpfs_{self.name}_connections", f"{self.name.title()} connections by result",
                       ("result",),
                       tuple(((result,), status[result]) for result in ("relayed", "refused", "dropped", "failed")))]

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _accept_loop(self) -> None:
        self._sock.settimeout(0.2)  # wakes up to notice stop()
        try:
            while not self._stopping.is_set():
                if not self._slots.acquire(timeout=0.2):
                    continue
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    self._slots.release()
                    continue
                except OSError as exc:
                    self._slots.release()
                    log.get().error("relay accept failed", error=str(exc))
                    self._stopping.wait(0.5)
                    continue
                pid = self._greet(conn)
                if pid is None:
                    self._slots.release()
                    continue
                worker = threading.Thread(target=self._serve, args=(conn, pid), name="relay-call", daemon=True)
                with self._lock:
                    self._workers.add(worker)
                worker.start()
        finally:
            self._sock.close()

    def _greet(self, conn) -> int | None:
        """The caller's pid once it has the banner; None if it is refused or gone (then closed). Done
        here, not in the call's thread: the caller then waits for the banner, not for a thread to start."""
        try:
            pid, uid = _peer(conn)
            if uid != 0:
                self._count("refused")
                log.get(component="relay").warning("relay refused a caller that is not root", peer_pid=pid,
                                                   peer_uid=uid)
                conn.close()
                return None
            conn.settimeout(self.REQUEST_TIMEOUT)
            conn.sendall(self.banner)
        except OSError as exc:
            self._count("dropped")
            log.get(component="relay").warning("relay call dropped before it started", error=str(exc))
            conn.close()
            return None
        return pid

    def _serve(self, conn, pid: int) -> None:
        logger = log.get(component="relay")
        try:
            with conn:
                self._serve_call(conn, pid, logger)
        except Exception as exc:  # one broken call must not take the agent down
            self._count("failed")
            logger.error("relay call failed", exc_info=exc)
        finally:
            with self._lock:
                self._workers.discard(_current_thread())
            self._slots.release()

    def _serve_call(self, conn, pid: int, logger) -> None:
        try:
            argv, env, node = decode_request(_read_frame(conn))
        except (OSError, ValueError) as exc:
            # The caller went away before its commit point, or spoke garbage: nothing was done.
            self._count("dropped")
            logger.warning("relay call dropped before it started", peer_pid=pid, error=str(exc))
            return
        if not (env.get("VAULTTMPFS_NODE_NAME") or env.get("NODE_NAME")):
            env["NODE_NAME"] = node  # the driver would default to its own host name, not the agent's
        self.respond(conn, argv, env, pid, logger)

    def respond(self, conn, argv: list[str], env: dict[str, str], pid: int, logger) -> None:
        """Do the call the frame asked for and answer it (node.broker_server answers otherwise)."""
        started = time.monotonic()
        payload, code = self.handler(argv, env)
        self._count("relayed")
        logger.info("relayed", verb=argv[0], dir=argv[1] if len(argv) > 1 else None, peer_pid=pid,
                    exit_code=code, ms=round((time.monotonic() - started) * 1000, 1))
        try:
            conn.sendall(encode_reply(payload, code))
        except OSError as exc:
            logger.warning("relay caller gone before the answer", verb=argv[0], peer_pid=pid, error=str(exc))


def _current_thread():
    return threading.current_thread()


def _peer(conn) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return pid, uid


def _read_frame(conn) -> bytes:
    head = b""
    while not head.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk or len(head) > 12:
            raise ValueError("no request frame")
        head += chunk
    size = int(head) if head[:-1].isdigit() else -1
    if not 0 <= size <= MAX_FRAME:
        raise ValueError(f"bad request frame size {head!r}")
    data = b""
    while len(data) < size:
        chunk = conn.recv(min(65536, size - len(data)))
        if not chunk:
            raise ValueError("request frame cut short")
        data += chunk
    return data


def _listen(path: str, banner: bytes = BANNER):
    """Bind under a temporary name, make it 0600, then rename: never a moment it is open to all."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    info = os.stat(parent)
    if stat.S_IMODE(info.st_mode) & 0o077 and not info.st_mode & stat.S_ISVTX:
        os.chmod(parent, 0o700)  # our own directory (e.g. /run/vaulttmpfs); leave shared sticky dirs alone
    try:
        _connect(path, banner).close()
    except (OSError, Refused):
        pass  # nobody answers there: a stale socket from a previous agent, replaced below
    else:
        raise DriverError(f"another node agent already serves {path}")
    temp = f"{path}.{os.getpid()}.tmp"
    if os.path.lexists(temp):
        os.unlink(temp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temp)
        os.chmod(temp, 0o600)
        sock.listen(128)
        os.replace(temp, path)
    except BaseException:
        sock.close()
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    return sock, os.stat(path).st_ino


def _unlink_if_ours(path: str, inode: int | None) -> None:
    try:
        if inode is not None and os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def serve(config, stop_event) -> None:
    """Run the relay on its own until `stop_event` is set (the agent runs it as one of its services)."""
    server = RelayServer(config)
    server.start()
    try:
        while not stop_event.wait(1.0):
            pass
    finally:
        server.stop()
