"""The engine's typed errors as gRPC status codes. The kubelet puts the message in the pod's events,
so it is the engine's own words: the attribute, path or Vault error to act on."""

from __future__ import annotations

import grpc

from ..errors import (
    BadRequest,
    Conflict,
    DriverError,
    Forbidden,
    StateFull,
    VaultBusy,
    VaultDenied,
    VaultRateLimited,
    VaultUnavailable,
)

# Most specific first: the typed errors are all DriverErrors.
_CODES = (
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),  # the spec's answer to an incompatible republish
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (VaultDenied, grpc.StatusCode.PERMISSION_DENIED),
    # A quota (Vault's, or this node's write budget) turned the call away before anything was made: gRPC's
    # code for "a per-user quota is exhausted"; the kubelet retries it with backoff, as UNAVAILABLE.
    (VaultRateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (VaultBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StateFull, grpc.StatusCode.RESOURCE_EXHAUSTED),  # gRPC's words: "perhaps the entire file system is out of space"
    (VaultUnavailable, grpc.StatusCode.UNAVAILABLE),  # the kubelet retries with backoff
    (DriverError, grpc.StatusCode.INTERNAL),
)


def of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception raised while serving a call; False for a bug (log it)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return grpc.StatusCode.INTERNAL, f"{exc.strerror or exc}{where}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def is_bug(exc: BaseException) -> bool:
    return not isinstance(exc, (DriverError, OSError))
