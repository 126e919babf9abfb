"""Atomic file replacement: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import threading


def fsync_dir(path: str) -> None:
    """Make a rename in `path` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: str, data: bytes, mode: int = 0o600, gid: int | None = None, durable: bool = True) -> None:
    """Write `data` to a temp file beside `path` (owner root, group `gid`), then rename it over `path`.

    durable: fsync the file and its directory (state that must outlive a crash); a tmpfs needs neither.
    """
    directory = os.path.dirname(os.path.abspath(path))
    # Per thread, not only per process: the node agent's relay writes from many threads at once.
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:  # a nearly full tmpfs takes part of a write: finish it, or get ENOSPC
                view = view[os.write(fd, view):]
            if gid is not None:
                os.fchown(fd, 0, gid)
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(directory)
