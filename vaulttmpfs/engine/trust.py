"""Is a path one only root can change? sshd's secure_filename(), for the files root acts on.

A root-owned, 0600 file is worth nothing if another user can rename a directory above it and put
their own in its place. So every directory from / down to the file must be owned by root and not
group/world-writable. A root-owned sticky directory (/tmp) may be world-writable higher up: others
can create entries there, but not move or replace root's.
"""

from __future__ import annotations

import os
import stat

from ..errors import DriverError


def check_dirs(path: str, what: str, strict_leaf: bool = True) -> None:
    """Refuse unless `path` (a directory; its missing tail is skipped) and every ancestor are root's.

    strict_leaf: `path` itself, when it exists, may not be writable by others even when sticky (a
    file is to be created or read there, by name).
    """
    wanted = os.path.realpath(path)
    current = _deepest_existing(wanted)
    leaf = current == wanted
    while True:
        info = os.stat(current)
        _check_dir(current, info, what, sticky_ok=not (leaf and strict_leaf))
        if current == "/":
            return
        current, leaf = os.path.dirname(current), False


def _deepest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _check_dir(path: str, info: os.stat_result, what: str, sticky_ok: bool) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise DriverError(f"{what}: {path} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    shared = mode & 0o022 and not (sticky_ok and mode & stat.S_ISVTX)
    if info.st_uid != 0 or shared:
        raise DriverError(
            f"{what}: directory {path} is not trusted (owner uid {info.st_uid}, mode {mode:04o}): every directory "
            "above a file root acts on must be owned by root and not group/world-writable (as sshd requires); "
            f"fix it with: chown root {path} && chmod go-w {path}"
        )
