"""structlog JSON lines to a file, never to the terminal streams the kubelet parses.

If the log file cannot be opened, logging degrades to nothing rather than failing a mount.
Token values registered with `secret()` are masked wherever they appear in an event.
"""

from __future__ import annotations

import os
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


def _open(path: str):
    if path == STDERR:  # pod-side commands: a container's log is its stderr
        import sys

        return sys.stderr
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")
    except OSError:
        return None


def get(log_file: str | None = None, **context: Any):
    """The process-wide logger (configured on first use), bound to `context`."""
    global _logger
    if _logger is None:
        handle = _open(log_file) if log_file else None
        if handle is None:
            _logger = _NullLogger()
        else:
            import structlog

            _logger = structlog.wrap_logger(
                structlog.WriteLogger(handle),
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
