"""structlog JSON lines to a file, never to the terminal streams the kubelet parses.

If the log file cannot be opened, logging degrades to nothing rather than failing a mount.
Token values registered with `secret()` are masked wherever they appear in an event.
VAULTTMPFS_LOG_LEVEL (debug, info, warning, error) drops lines below it. The file is kept under
VAULTTMPFS_LOG_MAX_BYTES: past it, whichever process writes next renames it to <file>.1 (one
generation kept) and every writer moves to the new file; SIGHUP makes the agent reopen it
(for logrotate's postrotate).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

_secrets: dict[str, None] = {}  # insertion-ordered: the oldest go first when the cap is reached
_logger = None
REDACTED = "<redacted>"
STDERR = "-"  # as a log file name: standard error
# The node agent lives for months and registers a token per mount it relays: keep the newest.
MAX_SECRETS = 4096
MIN_SECRET = 4  # shorter derived forms are not masked (they would blank unrelated text)


def secret(value: str | None) -> None:
    """Register a value that must never reach the log, in the forms it may be written in: as is,
    stripped, and escaped as repr() or JSON would (a "token\\n" quoted inside an error message)."""
    if not value:
        return
    for form in _forms(value):
        _secrets.pop(form, None)  # re-registered (the generator token): now among the newest
        _secrets[form] = None
    while len(_secrets) > MAX_SECRETS:
        _secrets.pop(next(iter(_secrets)), None)


def _forms(value: str) -> list[str]:
    import json

    derived = [value.strip(), repr(value)[1:-1], json.dumps(value)[1:-1]]
    return list(dict.fromkeys([value, *(f for f in derived if len(f) >= MIN_SECRET)]))


def accessor_hint(accessor: str | None) -> str:
    """An accessor's first characters: enough to find it, not enough to revoke it (any generator
    token may revoke any token by accessor, so non-pod accessors are not shown in full)."""
    return f"{accessor[:8]}..." if accessor else "unknown"


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        for token in tuple(_secrets):  # a snapshot: agent threads register secrets concurrently
            if token in value:
                value = value.replace(token, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def _redact_processor(_logger, _name, event_dict):
    return _redact(event_dict)


class _NullLogger:
    def __getattr__(self, _name):
        return lambda *args, **kwargs: None

    def bind(self, **_kwargs):
        return self


LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_file: "_LogFile | None" = None


class _LogFile:
    """An append-only log file shared by many processes, rotated by size without losing a line."""

    def __init__(self, path: str, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.reopen_requested = False
        self.fd = self._open()

    def _open(self) -> int:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        import stat

        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)  # not /dev/stdout: never rotated
        return fd

    def write(self, text: str) -> None:
        data = text.encode("utf-8", errors="replace")
        with self.lock:
            if self.reopen_requested or (self.max_bytes and self.regular and self._moved()):
                self._reopen()
            os.write(self.fd, data)
            if self.max_bytes and self.regular and os.fstat(self.fd).st_size > self.max_bytes:
                self._rotate()

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
        import fcntl

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


def _options() -> tuple[int, int]:
    """(level, max bytes) from the settings; defaults when they cannot be read (a log must not fail a call)."""
    try:
        from .config import Config, byte_size, log_level, setting

        level = log_level(setting("VAULTTMPFS_LOG_LEVEL", Config.log_level))
        max_bytes = byte_size(setting("VAULTTMPFS_LOG_MAX_BYTES", str(Config.log_max_bytes)),
                              "VAULTTMPFS_LOG_MAX_BYTES")
        return LEVELS[level], max_bytes
    except Exception:  # noqa: BLE001
        return LEVELS["info"], 10 * 1024 * 1024


def get(log_file: str | None = None, **context: Any):
    """The process-wide logger (configured on first use), bound to `context`."""
    global _logger, _file
    if _logger is None:
        level, max_bytes = _options()
        try:
            _file = _LogFile(log_file, max_bytes) if log_file and log_file != STDERR else None
        except OSError:
            _file = None
        # pod-side commands: a container's log is its stderr
        handle = sys.stderr if log_file == STDERR else _file
        if handle is None:
            _logger = _NullLogger()
        else:
            import structlog

            _logger = structlog.wrap_logger(
                structlog.WriteLogger(handle),
                wrapper_class=structlog.make_filtering_bound_logger(level),
                processors=[
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    _redact_processor,
                    structlog.processors.JSONRenderer(sort_keys=False),
                    _redact_processor,  # again on the line as written: escapes JSON added included
                ],
                context_class=dict,
                cache_logger_on_first_use=True,
            ).bind(pid=os.getpid())
    return _logger.bind(**context) if context else _logger
