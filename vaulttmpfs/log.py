"""structlog JSON lines to a file, never to the terminal streams the kubelet parses.

A kubelet call (the exec) writes the same lines with `_LineLogger`, stdlib only: structlog costs
~35 ms of import, more than the whole brokered mount (docs/performance-flexvolume.md).

If the log file cannot be opened, logging degrades to nothing rather than failing a mount; a
line that cannot be written (a full disk) is dropped.
Token values registered with `secret()` are masked wherever they appear in an event.
VAULTTMPFS_LOG_LEVEL (debug, info, warning, error) drops lines below it. The file is kept under
VAULTTMPFS_LOG_MAX_BYTES: past it, whichever process writes next renames it to <file>.1 (one
generation kept) and every writer moves to the new file; SIGHUP makes the agent reopen it
(for logrotate's postrotate).
"""

from __future__ import annotations

import _thread  # not threading: a lock is all this needs (the exec path need not load threading)
import errno
import fcntl
import os
import stat
import sys
import time

from . import jsonlite  # json's output, without json's import (re, enum: ~5 ms of a kubelet call)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms on the exec path)
if TYPE_CHECKING:
    from typing import Any

_secrets: dict[str, None] = {}  # insertion-ordered: the oldest go first when the cap is reached
# Secrets indexed by the WINDOW-character slices ending at their last WINDOW positions: a line is
# then looked up every WINDOW characters, whatever the number of secrets (any secret at least
# 2*WINDOW-1 long that occurs in it covers one of those slices). Not by their first characters:
# Vault tokens share a prefix ("hvs.CAESI..."). Shorter secrets are searched for one by one.
WINDOW = 8
_index: dict[str, dict[str, None]] = {}
_short: dict[str, None] = {}
_registry_lock = _thread.allocate_lock()
FEW_SECRETS = 100  # up to this many, a plain search per secret is faster than the index
_logger = None
REDACTED = "<redacted>"
STDERR = "-"  # as a log file name: standard error
# The node agent lives for months and registers a token per mount it relays: keep the newest.
MAX_SECRETS = 4096
MIN_SECRET = 4  # shorter derived forms are not masked (they would blank unrelated text)


def secret(value: str | None) -> None:
    """Register a value that must never reach the log (a "token\\n" quoted inside an error message
    included: see _forms)."""
    if not value:
        return
    with _registry_lock:
        for form in _forms(value):
            _forget(form)  # re-registered (the generator token): now among the newest
            _secrets[form] = None
            if len(form) >= 2 * WINDOW - 1:
                for window in _windows(form):
                    _index.setdefault(window, {})[form] = None
            else:
                _short[form] = None
        while len(_secrets) > MAX_SECRETS:
            _forget(next(iter(_secrets)))


def _forget(form: str) -> None:
    if _secrets.pop(form, 0) is not None:
        return  # not registered
    _short.pop(form, None)
    if len(form) >= 2 * WINDOW - 1:
        for window in _windows(form):
            bucket = _index.get(window, {})
            bucket.pop(form, None)
            if not bucket:
                _index.pop(window, None)


def _windows(form: str) -> set[str]:
    return {form[len(form) - back - WINDOW:len(form) - back] for back in range(WINDOW)}


def _forms(value: str) -> list[str]:
    """The value as it may appear on a written line: as is or stripped, inside a repr(), and each
    of those JSON-escaped (lines are masked as rendered, after JSON added its escapes)."""
    plain = {value, value.strip()}
    quoted = plain | {repr(form)[1:-1] for form in plain}
    written = quoted | {jsonlite.dumps(form)[1:-1] for form in quoted}
    return list(dict.fromkeys([value, *sorted(f for f in written if len(f) >= MIN_SECRET)]))


def accessor_hint(accessor: str | None) -> str:
    """An accessor's first characters: enough to find it, not enough to revoke it (any generator
    token may revoke any token by accessor, so non-pod accessors are not shown in full)."""
    return f"{accessor[:8]}..." if accessor else "unknown"


def _mask(text: str) -> str:
    # Snapshots (tuple() of a dict is atomic): agent threads register secrets concurrently.
    if len(_secrets) <= FEW_SECRETS:
        found = [token for token in tuple(_secrets) if token in text]
    else:
        found = [token for token in tuple(_short) if token in text]
        get = _index.get
        for end in range(WINDOW, len(text) + 1, WINDOW):
            bucket = get(text[end - WINDOW:end])
            if bucket:
                found += [token for token in tuple(bucket) if token in text]
    for token in sorted(set(found), key=len, reverse=True):  # a secret inside a longer one: the longer first
        text = text.replace(token, REDACTED)
    return text


def _redact_processor(_logger, _name, line: str) -> str:
    return _mask(line) if _secrets else line


class _NullLogger:
    def __getattr__(self, _name):
        return lambda *args, **kwargs: None

    def bind(self, **_kwargs):
        return self


LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class _LineLogger:
    """structlog's bound logger as configure() builds it, for one short process: the same JSON line
    (event, context, level, timestamp, exception), masked as written, from the stdlib only."""

    def __init__(self, handle, min_level: int, context: dict[str, Any]):
        self._handle, self._min, self._context = handle, min_level, context

    def bind(self, **context: Any) -> _LineLogger:
        return _LineLogger(self._handle, self._min, {**self._context, **context})

    def _write(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if LEVELS[level] < self._min:
            return
        exc = fields.pop("exc_info", None)
        line = {**self._context, **fields, "event": event, "level": level,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"}
        if exc:
            import traceback  # only for a bug's line

            error = exc if isinstance(exc, BaseException) else sys.exc_info()[1]
            line["exception"] = "".join(traceback.format_exception(error)) if error else ""
        self._handle.write(_redact_processor(None, level, jsonlite.dumps(line, default=repr)) + "\n")

    def debug(self, event: str, **fields: Any) -> None:
        self._write("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._write("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._write("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._write("error", event, fields)

_file: "_LogFile | None" = None


class _Stderr:
    """Standard error as a log destination (a container's log), one write(2) per line as _LogFile: a line
    it cannot take (the log pipe's reader gone) is dropped, never raised into the command that logs it.
    Not through sys.stderr, whose buffer would keep the line and fail the interpreter's exit (status 120)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.lock = _thread.allocate_lock()

    def write(self, text: str) -> None:
        data = text.encode("utf-8", errors="replace")
        with self.lock:
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:  # EPIPE, EIO, EBADF
                pass

    def flush(self) -> None:
        pass  # every line is one write(2)


def _stderr() -> _Stderr | None:
    try:
        return _Stderr(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # started without a stderr (None), or one with no fd
        return None


class _LogFile:
    """An append-only log file shared by many processes, rotated by size without losing a line."""

    def __init__(self, path: str, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes
        self.lock = _thread.allocate_lock()
        self.reopen_requested = False
        self.fd = self._open()

    def _open(self) -> int:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        # Root appends here, often in a dir others may write (/var/log is 0775 root:syslog on Ubuntu): never
        # through their symlink, into their file, or into a FIFO's blocking open (a call would hang).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        by_name = True
        try:
            fd = os.open(self.path, flags | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP or os.lstat(self.path).st_uid != 0:
                raise
            fd, by_name = os.open(self.path, flags, 0o600), False  # root's own symlink, such as /dev/stdout
        info = os.fstat(fd)
        if by_name and not stat.S_ISCHR(info.st_mode) and info.st_uid not in (0, os.geteuid()):
            os.close(fd)
            raise OSError(errno.EPERM, f"owned by uid {info.st_uid}", self.path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)  # a full pipe waits
        self.regular = stat.S_ISREG(info.st_mode)  # not /dev/stdout: never rotated
        return fd

    def write(self, text: str) -> None:
        """Append one line. A line that cannot be written (the log's disk full, an I/O error, a
        rotation that fails) is dropped: a log line never fails the call that writes it (a mount
        that minted, an unmount that revoked). The next line tries again."""
        data = text.encode("utf-8", errors="replace")
        with self.lock:
            try:
                self._append(data)
            except OSError:
                pass

    def _append(self, data: bytes) -> None:
        if self.reopen_requested or (self.max_bytes and self.regular and self._moved()):
            self._reopen()
        # Rotated before the line that would cross the limit, not after it: the newest line is
        # always in the current file (where an operator looks first).
        if self.max_bytes and self.regular:
            size = os.fstat(self.fd).st_size
            if size and size + len(data) > self.max_bytes:
                self._rotate()
        os.write(self.fd, data)

    def flush(self) -> None:
        pass  # every line is one write(2)

    def _moved(self) -> bool:
        # Another process rotated the file (or logrotate moved it): follow it to the new one.
        try:
            now, ours = os.stat(self.path), os.fstat(self.fd)
        except FileNotFoundError:
            return True
        return (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino)

    def _rotate(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # two writers past the limit: only one renames
        try:
            if not self._moved():
                os.replace(self.path, self.path + ".1")
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._reopen()

    def _reopen(self) -> None:
        self.reopen_requested = False
        try:
            fd = self._open()
        except OSError:
            return  # keep writing where we were
        os.close(self.fd)
        self.fd = fd


def reopen() -> None:
    """Reopen the log file at its path on the next line (the agent's SIGHUP handler; async-signal safe)."""
    if _file is not None:
        _file.reopen_requested = True


def configure(config, lean: bool = False) -> None:
    """Where this process's lines go, from its settings (`config.log_file`, `log_level`,
    `log_max_bytes`): once, by the front end that read them (a driver call, an operator command,
    the agent, the pod's command). A file that cannot be opened turns logging off, never a call.
    lean: a kubelet call's lines, written without structlog (see _LineLogger)."""
    global _logger, _file
    if _file is not None:
        os.close(_file.fd)
    log_file = config.log_file
    try:
        _file = _LogFile(log_file, config.log_max_bytes) if log_file and log_file != STDERR else None
    except OSError:
        _file = None
    handle = _stderr() if log_file == STDERR else _file  # pod-side commands: a container's log is its stderr
    if handle is None:
        _logger = _NullLogger()
        return
    level = LEVELS.get(config.log_level, LEVELS["info"])
    if lean:
        _logger = _LineLogger(handle, level, {"pid": os.getpid()})
        return
    import structlog  # the agent's and the commands' (~35 ms): not a kubelet call's

    _logger = structlog.wrap_logger(
        structlog.WriteLogger(handle),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
            _redact_processor,  # on the line as written: one search, each escaped form registered
        ],
        context_class=dict,
        cache_logger_on_first_use=True,
    ).bind(pid=os.getpid())


def get(**context: Any):
    """The process's logger, bound to `context`; one that writes nothing until `configure()`."""
    logger = _logger if _logger is not None else _NullLogger()
    return logger.bind(**context) if context else logger
