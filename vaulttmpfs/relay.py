"""The fast path: a thin driver call hands mount/unmount to the warm node agent over a unix socket.

A driver process that does the work itself imports hvac and requests first (~150 ms on every
call, 50 at once when a node starts 50 pods). The agent has them loaded, so the driver only
sends its argv and the settings it was started with, and passes the agent's answer on.

One call per connection:
  agent  -> driver  BANNER                 alive, a worker is on this connection
  driver -> agent   request frame          the commit point: from here on the call is the agent's
  agent  -> driver  "<exit code>\\n<JSON answer>\\n", then close

The driver falls back to doing the work itself only before the commit point (no socket, a stale
socket, no banner in time): the agent acts only on a complete request frame, so a call the
driver gave up on was never started. After the commit the driver never redoes the call, which
could mint a second token; whatever goes wrong then is the call's Failure, and the kubelet calls
again later (mount and unmount are idempotent).

The client half runs inside the kubelet's call, so it imports only what is already loaded at
startup; the server half imports what it needs when it starts.
"""

from __future__ import annotations

import os
import sys

BANNER = b"vaulttmpfs-relay/1\n"
DEFAULT_SOCKET = "/run/vaulttmpfs/agent.sock"  # Config.agent_socket; not imported: config costs ~10 ms
SOCKET_ENV = "VAULTTMPFS_AGENT_SOCKET"
ACCEPT_TIMEOUT = 2.0  # connect + banner; past it the agent is wedged or overloaded: do the work here
REPLY_TIMEOUT = 120.0  # bounds a wedged agent (the kubelet has no timeout); above Vault's own bounds
MAX_FRAME = 1 << 20
# The driver's settings travel with the call, so the agent acts as the kubelet configured the driver.
FORWARDED_PREFIXES = ("VAULT_", "VAULTTMPFS_")
FORWARDED_NAMES = {"NODE_NAME"}
NOT_FORWARDED = {"VAULT_TOKEN"}  # never read by the driver; no reason to carry a credential around


class Refused(Exception):
    """The agent did not take the call; nothing was sent, so doing it here is safe."""


# ---------------------------------------------------------------- client (inside the driver call)

def forward(argv: list[str], env: dict[str, str] | None = None) -> tuple[bytes, int] | None:
    """The agent's answer (one JSON line, exit code); None when no agent took the call."""
    env = os.environ if env is None else env
    path = env.get(SOCKET_ENV) or DEFAULT_SOCKET
    try:
        sock = _connect(path)
    except (OSError, Refused):
        return None
    committed = False
    try:
        try:
            sock.sendall(encode_request(argv, env, os.uname().nodename))
        except OSError:
            return None  # the frame did not arrive whole: the agent drops incomplete frames
        committed = True
        sock.settimeout(REPLY_TIMEOUT)
        payload, code = decode_reply(_read_all(sock))
    except BaseException as exc:  # noqa: BLE001 -- after the commit every outcome is an answer
        if not committed:
            return None
        return _failure(f"the node agent took the call but did not answer ({_why(exc)}); not redone here, "
                        "which could mint a second token. The kubelet will call again"), 1
    finally:
        sock.close()
    if code == 0 and argv[0] == "mount" and len(argv) > 1 and not os.path.ismount(argv[1]):
        return _invisible_mount(argv[1], env), 1
    return payload, code


def _connect(path: str):
    # _socket, not socket: socket imports enum and friends, ~5 ms of this call's ~15.
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(ACCEPT_TIMEOUT)
        sock.connect(path)
        # The agent must be root too: a socket someone else managed to put there gets no call.
        cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
        if int.from_bytes(cred[4:8], sys.byteorder) != 0:
            raise Refused(f"{path} is served by uid {int.from_bytes(cred[4:8], sys.byteorder)}, not root")
        banner = b""
        while not banner.endswith(b"\n") and len(banner) < len(BANNER):
            chunk = sock.recv(len(BANNER) - len(banner))
            if not chunk:
                break
            banner += chunk
        if banner != BANNER:
            raise Refused(f"no relay banner from {path}: {banner[:40]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def _read_all(sock) -> bytes:
    data = b""
    while len(data) <= MAX_FRAME:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise ValueError("answer larger than the frame limit")


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {REPLY_TIMEOUT:.0f} s"
    return str(exc) or type(exc).__name__


def _failure(message: str) -> bytes:
    import json  # only on this rare path: json (and re under it) is ~8 ms of startup

    return json.dumps({"status": "Failure", "message": message}).encode() + b"\n"


def _invisible_mount(mount_dir: str, env) -> bytes:
    # The agent mounted in a mount namespace the kubelet does not share: the pod would get an
    # empty directory. Have the agent undo it (revokes the token) and say what to fix.
    undo = forward(["unmount", mount_dir], env)
    undone = "undone" if undo and undo[1] == 0 else "NOT undone (unmount will retry)"
    return _failure(f"the node agent mounted {mount_dir} but the kubelet cannot see that mount ({undone}): "
                    "run the agent with the kubelet's pods dir mounted at the same path with "
                    "mountPropagation: Bidirectional, or stop it so the driver mounts by itself")


# ---------------------------------------------------------------- wire format (both halves)

def forwarded_env(env) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if (k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES) and k not in NOT_FORWARDED}


def encode_request(argv: list[str], env, node: str) -> bytes:
    # NUL-separated: argv and environment strings cannot contain NUL. No json: see _failure().
    fields = [node, str(len(argv)), *argv, *(f"{k}={v}" for k, v in forwarded_env(env).items())]
    payload = "\0".join(fields).encode("utf-8", "surrogateescape")
    return b"%d\n" % len(payload) + payload


def decode_request(payload: bytes) -> tuple[list[str], dict[str, str], str]:
    fields = payload.decode("utf-8", "surrogateescape").split("\0")
    if len(fields) < 2 or not fields[1].isdigit() or len(fields) < 2 + int(fields[1]):
        raise ValueError("malformed relay request")
    argc = int(fields[1])
    argv, pairs = fields[2:2 + argc], fields[2 + argc:]
    if not argv or any("=" not in pair for pair in pairs):
        raise ValueError("malformed relay request")
    return argv, dict(pair.split("=", 1) for pair in pairs), fields[0]


def encode_reply(payload: bytes, code: int) -> bytes:
    return b"%d\n" % code + payload


def decode_reply(data: bytes) -> tuple[bytes, int]:
    head, sep, payload = data.partition(b"\n")
    if not sep or not head.isdigit() or not payload.startswith(b"{") or not payload.endswith(b"}\n"):
        raise ValueError(f"garbled answer from the node agent: {data[:80]!r}")
    return payload, int(head)


# ---------------------------------------------------------------- server (inside the node agent)

def handle_call(argv: list[str], env: dict[str, str]) -> tuple[bytes, int]:
    """Run one kubelet call in this process, as the driver would with the caller's settings."""
    from . import protocol

    return protocol.encode(protocol.handle(argv, env))


class RelayServer:
    """Serves the socket for the agent; a `Service` there (start/stop/status/healthy/alive)."""

    name = "relay"
    MAX_INFLIGHT = 128  # past this, callers wait for the banner and then do the work themselves
    REQUEST_TIMEOUT = 10.0
    STOP_GRACE = 120.0  # a call in flight is finished, not cut: a half-done mount helps nobody

    def __init__(self, config, handler=handle_call):
        import threading

        self.config = config
        self.path = config.agent_socket
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
        import threading

        from . import log

        log.get(self.config.log_file)  # configure once, before worker threads race to it
        _warm_up()
        self._sock, self._inode = _listen(self.path)
        self._thread = threading.Thread(target=self._accept_loop, name="relay", daemon=True)
        self._thread.start()
        log.get(self.config.log_file, component="relay").info("relay listening", socket=self.path)

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

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _accept_loop(self) -> None:
        import threading

        from . import log

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
                worker = threading.Thread(target=self._serve, args=(conn,), name="relay-call", daemon=True)
                with self._lock:
                    self._workers.add(worker)
                worker.start()
        finally:
            self._sock.close()

    def _serve(self, conn) -> None:
        from . import log

        logger = log.get(self.config.log_file, component="relay")
        try:
            with conn:
                self._serve_call(conn, logger)
        except Exception as exc:  # noqa: BLE001 -- one broken call must not take the agent down
            self._count("failed")
            logger.error("relay call failed", exc_info=exc)
        finally:
            with self._lock:
                self._workers.discard(_current_thread())
            self._slots.release()

    def _serve_call(self, conn, logger) -> None:
        import time

        pid, uid = _peer(conn)
        if uid != 0:
            self._count("refused")
            logger.warning("relay refused a caller that is not root", peer_pid=pid, peer_uid=uid)
            return
        conn.settimeout(self.REQUEST_TIMEOUT)
        try:
            conn.sendall(BANNER)
            argv, env, node = decode_request(_read_frame(conn))
        except (OSError, ValueError) as exc:
            # The caller went away before its commit point, or spoke garbage: nothing was done.
            self._count("dropped")
            logger.warning("relay call dropped before it started", peer_pid=pid, error=str(exc))
            return
        if not (env.get("VAULTTMPFS_NODE_NAME") or env.get("NODE_NAME")):
            env["NODE_NAME"] = node  # the driver would default to its own host name, not the agent's
        started = time.monotonic()
        payload, code = self.handler(argv, env)
        self._count("relayed")
        logger.info("relayed", verb=argv[0], dir=argv[1] if len(argv) > 1 else None, peer_pid=pid,
                    exit_code=code, ms=round((time.monotonic() - started) * 1000, 1))
        try:
            conn.sendall(encode_reply(payload, code))
        except OSError as exc:
            logger.warning("relay caller gone before the answer", verb=argv[0], peer_pid=pid, error=str(exc))


def _warm_up() -> None:
    # What a call would import: paid once here instead of on the first pod's mount.
    from . import driver, protocol, vault  # noqa: F401  -- vault first: it quiets requests' import warning

    import hvac  # noqa: F401
    import requests  # noqa: F401


def _current_thread():
    import threading

    return threading.current_thread()


def _peer(conn) -> tuple[int, int]:
    import socket
    import struct

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


def _listen(path: str):
    """Bind under a temporary name, make it 0600, then rename: never a moment it is open to all."""
    import socket
    import stat

    from .errors import DriverError

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    info = os.stat(parent)
    if stat.S_IMODE(info.st_mode) & 0o077 and not info.st_mode & stat.S_ISVTX:
        os.chmod(parent, 0o700)  # our own directory (e.g. /run/vaulttmpfs); leave shared sticky dirs alone
    try:
        _connect(path).close()
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
