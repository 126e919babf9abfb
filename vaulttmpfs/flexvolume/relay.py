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

This module is the client half and the wire format: it runs inside the kubelet's call, so it imports
only what is already loaded at startup. The server half is `node.relay_server`, in the agent.
"""

from __future__ import annotations

import os
import sys

BANNER = b"vaulttmpfs-relay/1\n"
DEFAULT_SOCKET = "/run/vaulttmpfs/agent.sock"  # Config.agent_socket; config is not imported by a relayed call
SOCKET_ENV = "VAULTTMPFS_AGENT_SOCKET"
ACCEPT_TIMEOUT = 2.0  # connect + banner; past it the agent is wedged or overloaded: do the work here
REPLY_TIMEOUT = 120.0  # bounds a wedged agent (the kubelet has no timeout); above Vault's own bounds
MAX_FRAME = 1 << 20
# The driver's settings travel with the call, so the agent acts as the kubelet configured the driver.
FORWARDED_PREFIXES = ("VAULT_", "VAULTTMPFS_")
FORWARDED_NAMES = {"NODE_NAME"}
NOT_FORWARDED = {"VAULT_TOKEN"}  # never read by the driver; no reason to carry a credential around


fell_back = False  # this call found a relay socket but no agent took the call (counted in /metrics)


class Refused(Exception):
    """The agent did not take the call; nothing was sent, so doing it here is safe."""


# ---------------------------------------------------------------- client (inside the driver call)

def forward(argv: list[str], env: dict[str, str] | None = None) -> tuple[bytes, int] | None:
    """The agent's answer (one JSON line, exit code); None when no agent took the call."""
    env = os.environ if env is None else env
    path = env.get(SOCKET_ENV) or DEFAULT_SOCKET
    global fell_back
    try:
        sock = _connect(path)
    except (OSError, Refused) as exc:
        fell_back = not isinstance(exc, FileNotFoundError)  # no socket at all: no agent meant to relay
        return None
    committed = False
    try:
        try:
            sock.sendall(encode_request(argv, env, os.uname().nodename))
        except OSError:
            fell_back = True
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


def _connect(path: str, banner: bytes = BANNER):
    """A connection to the root-served socket at `path` that answered with `banner` (the broker's too)."""
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
        got = b""
        while not got.endswith(b"\n") and len(got) < len(banner):
            chunk = sock.recv(len(banner) - len(got))
            if not chunk:
                break
            got += chunk
        if got != banner:
            raise Refused(f"no {banner.decode().split('/')[0]} banner from {path}: {got[:40]!r}")
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
    from .. import jsonlite  # only on this rare path

    return jsonlite.dumps({"status": "Failure", "message": message}).encode() + b"\n"


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
