"""What each volume call did (outcome, reason, duration, Vault round trips), for the agent's /metrics.

Stdlib only and cheap: it runs inside the kubelet's calls. A driver process appends one JSON line
per call to <state dir>/metrics/calls.jsonl (root-only, under flock, capped in size) and the
agent folds the file into its counters, so calls made without the agent are counted too. The record
is written after the answer and the kubelet waits for the process to exit: it is dropped rather than
waited for, or written anywhere but a regular file in a state dir the store would trust. Inside
the agent (relayed calls, its own Vault calls) a sink set by `node.metrics` takes them directly.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from _thread import _local  # threading.local is this class; threading itself costs a kubelet call ~0.6 ms

from . import jsonlite
from .errors import BadRequest, DriverError, VaultBusy, VaultDenied, VaultRateLimited, VaultUnavailable

SPOOL_DIR = "metrics"
SPOOL_FILE = "calls.jsonl"
MAX_SPOOL_BYTES = 1 << 20  # ~5000 calls; past it (no agent folding) further records are dropped
LOCK_TRIES = 200  # 1 ms apart: a spool locked longer costs its record, never the call's exit (only root can lock it:
# the trust check; a burst of calls on two busy cores can hold it for tens of ms between them)
# The reason label: a small fixed set, so a Prometheus series never carries a message.
REASONS = ("ok", "bad_request", "refused", "denied", "rate_limited", "vault_busy", "vault_unavailable", "os_error",
           "internal")
VAULT_CALLS = {"creating": "create", "revoking": "revoke", "looking": "lookup", "renewing": "renew",
               "logging": "login", "reading": "read", "writing": "write"}

_sink = None  # node.metrics.Metrics in the agent; None in a driver process
_local = _local()


def set_sink(sink) -> None:
    global _sink
    _sink = sink


def begin() -> None:
    """A volume call starts on this thread: its Vault round trips are kept with it."""
    _local.vault = []
    _local.revocations = []
    _local.throttled = []
    _local.reason = "ok"


def failed(exc: BaseException) -> None:
    """The call on this thread failed with `exc` (the front end turns it into an answer)."""
    _local.reason = reason(exc)


def reason(exc: BaseException) -> str:
    if isinstance(exc, VaultRateLimited):
        return "rate_limited"
    if isinstance(exc, VaultBusy):
        return "vault_busy"
    if isinstance(exc, VaultUnavailable):
        return "vault_unavailable"
    if isinstance(exc, VaultDenied):
        return "denied"
    if isinstance(exc, BadRequest):
        return "bad_request"
    if isinstance(exc, OSError):  # before DriverError: a state dir that cannot be written is both
        return "os_error"
    if isinstance(exc, DriverError):
        return "refused"  # admission, bindings, settings, a mount that is not ours
    return "internal"


def vault_call(action: str, seconds: float, ok: bool) -> None:
    kind = VAULT_CALLS.get(action.split(" ", 1)[0], "other")
    if _sink is not None:
        _sink.vault_call(kind, seconds, ok)
    elif getattr(_local, "vault", None) is not None:
        _local.vault.append([kind, round(seconds, 6), 1 if ok else 0])


def revocation(seconds: float) -> None:
    """A pod token was revoked `seconds` after it was owed (the revoke call; for a queued one, since it was
    queued): the agent's revocation latency histogram."""
    if _sink is not None:
        _sink.revocation(seconds)
    elif getattr(_local, "revocations", None) is not None:
        _local.revocations.append(round(seconds, 6))


def rate_limited(action: str) -> None:
    """Vault answered 429 (a rate-limit quota) to the call on this thread; counted whether or not a
    retry then got through."""
    kind = VAULT_CALLS.get(action.split(" ", 1)[0], "other")
    if _sink is not None:
        _sink.rate_limited_call(kind)
    elif getattr(_local, "vault", None) is not None:
        _local.throttled = [*getattr(_local, "throttled", []), kind]


def finish(verb: str, ok: bool, seconds: float, state_dir: str, via: str = "driver", front_end: str = "flexvolume",
           relay: str = "") -> None:
    """Record the call that began on this thread, in the agent's sink, else spooled under the call's
    `state_dir`; never raises (metrics must not fail a mount)."""
    record = {"verb": verb, "front_end": front_end, "via": via, "outcome": "success" if ok else "failure",
              "reason": "ok" if ok else getattr(_local, "reason", "internal"), "seconds": round(seconds, 6),
              "vault": getattr(_local, "vault", None) or [], "relay": relay,
              "revocations": getattr(_local, "revocations", None) or [],
              "throttled": getattr(_local, "throttled", None) or []}
    if not ok and record["reason"] == "ok":
        record["reason"] = "internal"
    _local.vault = _local.revocations = _local.throttled = None
    try:
        if _sink is not None:
            _sink.call(record)
        else:
            _append(state_dir, record)
    except Exception:  # noqa: BLE001
        pass


def _append(state_dir: str, record: dict) -> None:
    # After the answer, and the kubelet waits for the exit: nothing here may block (a FIFO, a lock held).
    fd = _open_spool(state_dir, os.O_WRONLY | os.O_APPEND | os.O_CREAT, create=True)
    if fd < 0:
        return
    try:
        if _lock(fd) and os.fstat(fd).st_size < MAX_SPOOL_BYTES:
            os.write(fd, jsonlite.dumps(record, separators=(",", ":")).encode() + b"\n")
    finally:
        os.close(fd)


def fold(state_dir: str) -> list[dict]:
    """Take every record the driver processes spooled (the agent calls this); the file is left empty.
    A spool that is busy (or not one the store would trust) is left for the next fold."""
    fd = _open_spool(state_dir, os.O_RDWR, create=False)
    if fd < 0:
        return []
    try:
        if not _lock(fd):
            return []
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    records = []
    for line in b"".join(chunks).splitlines():
        try:
            record = jsonlite.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _open_spool(state_dir: str, flags: int, create: bool) -> int:
    """An fd on the spool, or -1: only in a state dir the store would trust (trust.check_dirs: a node user's
    dir would have root write where they point it), only a regular file, reached through no symlink below
    the state dir, opened non-blocking (a FIFO there would hang the call)."""
    from . import trust  # the store's own check (engine.state loads it too)

    try:
        trust.check_dirs(state_dir, "state dir")
        if create and not os.path.isdir(state_dir):
            os.makedirs(state_dir, mode=0o700, exist_ok=True)  # its parents were checked above
            trust.check_dirs(state_dir, "state dir")  # in a sticky parent another user may have made it first
    except DriverError:
        return -1
    try:
        root = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # walked just now: no one else's
        try:
            if create:
                try:
                    os.mkdir(SPOOL_DIR, 0o700, dir_fd=root)
                except FileExistsError:
                    pass
            directory = os.open(SPOOL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        finally:
            os.close(root)
        try:
            info = os.fstat(directory)
            if info.st_uid != 0 or info.st_mode & 0o022:
                return -1
            fd = os.open(SPOOL_FILE, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o600,
                         dir_fd=directory)
        finally:
            os.close(directory)
    except OSError:  # a symlink (ELOOP), a FIFO without a reader (ENXIO), not a dir: no spool
        return -1
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return -1
    return fd


def _lock(fd: int) -> bool:
    """flock, waiting at most ~LOCK_TRIES ms: the agent's fold and other calls hold it for well under that."""
    for _ in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.001)
    return False
