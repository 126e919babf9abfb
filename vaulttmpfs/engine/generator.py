"""The node's generator token file: read it like ssh reads a private key, write it atomically."""

from __future__ import annotations

import os
import stat

from .. import trust
from ..errors import DriverError
from . import files


def read_token(path: str) -> str:
    try:
        # Non-blocking: a FIFO (or a device) put there must not hang the call; its type is checked next.
        # Through directories and symlinks only root can change: else another user could swap in a token.
        fd = trust.open_file(path, f"generator token file {path}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise DriverError(
            f"generator token file {path} does not exist; run `vaulttmpfs bootstrap` on this node "
            "(or set VAULTTMPFS_GENERATOR_TOKEN_PATH)"
        ) from None
    except OSError as exc:
        raise DriverError(f"cannot open generator token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DriverError(f"generator token file {path} is not a regular file; run `vaulttmpfs bootstrap` "
                              "on this node to write one")
        if info.st_uid != os.geteuid():
            raise DriverError(
                f"generator token file {path} is owned by uid {info.st_uid}, not {os.geteuid()}; "
                f"fix it with: chown {os.geteuid()} {path}"
            )
        if info.st_mode & 0o077:
            raise DriverError(
                f"generator token file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"fix it with: chmod 600 {path}"
            )
        token = handle.read(4096).decode("utf-8", errors="replace").strip()
    if not token:
        raise DriverError(f"generator token file {path} is empty; run `vaulttmpfs bootstrap` on this node")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        # It goes into an HTTP header: say so here rather than fail deep inside http.client.
        raise DriverError(f"generator token file {path} does not hold a Vault token (it must be one line of "
                          "printable ASCII); run `vaulttmpfs bootstrap` on this node")
    return token


def write_token(path: str, token: str) -> None:
    """0600 file in a 0700 dir, replaced atomically and durably: the driver never reads half a
    token, and a crash right after cannot leave the node without one."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700)
    files.replace(path, (token + "\n").encode(), 0o600)


def existing_token(path: str) -> str | None:
    """Whatever token the file holds, even with a bad mode (bootstrap checks if it is live); None if none.
    Never through a symlink, a fifo or another user's file: bootstrap may revoke what it reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise DriverError(f"{path} is a symlink; vaulttmpfs will not follow it: remove it "
                              f"(`rm {path}`) and run bootstrap again") from None
        raise DriverError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise DriverError(f"{path} is not a regular file owned by uid {os.geteuid()}; remove it "
                              f"(`rm {path}`) and run bootstrap again")
        return handle.read(4096).decode("utf-8", errors="replace").strip() or None


def lookup(config) -> dict:
    """What Vault knows of the node's generator token (ttl, policies, period, ...)."""
    from ..vault.client import Vault

    return Vault(config, read_token(config.generator_token_path)).lookup_self()


def renew(config, increment: str | None = None) -> dict:
    """Renew the node's generator token; its auth block (lease_duration, policies, ...) comes back."""
    from ..vault.client import Vault

    return Vault(config, read_token(config.generator_token_path)).renew_self(increment)
