"""Atomic file replacement: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import _thread  # not threading (~0.6 ms more of a kubelet call): a thread and a lock are all this needs
import errno
import os
import stat


def fsync_dir(path: str) -> None:
    """Make a rename in `path` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Unlink `path`; one already gone is fine (contextlib.suppress without contextlib's import)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def replace(path: str, data: bytes, mode: int = 0o600, gid: int | None = None, durable: bool = True) -> None:
    """Write `data` to a temp file beside `path` (owner root, group `gid`), then rename it over `path`.

    durable: fsync the file and its directory (state that must outlive a crash); a tmpfs needs neither.
    """
    os.close(_replace(path, data, mode, gid, fsync_first=durable))
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_then_sync(path: str, data: bytes, mode: int = 0o600, gid: int | None = None) -> "Sync":
    """For a new file: replace() now, and the fsyncs that make it survive a crash run meanwhile in
    another thread, so the caller gets on with its work; wait() on the result before relying on it.
    (The rename comes before the data's fsync: a crash in between may leave the name with nothing in
    it, which replace() never does. A reader must take an empty or torn file as no file.)"""
    return Sync(_replace(path, data, mode, gid, fsync_first=False), os.path.dirname(os.path.abspath(path)))


class Sync:
    def __init__(self, fd: int, directory: str):
        self.error: OSError | None = None
        self._done = _thread.allocate_lock()
        self._done.acquire()  # released by the fsync thread when it is over
        _thread.start_new_thread(self._run, (fd, directory))

    def _run(self, fd: int, directory: str) -> None:
        try:
            os.fsync(fd)
            fsync_dir(directory)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(fd)
            self._done.release()

    def wait(self) -> None:
        with self._done:
            pass
        if self.error:
            raise self.error


def _replace(path: str, data: bytes, mode: int, gid: int | None, fsync_first: bool) -> int:
    """The temp file's write (and fsync) and rename; returns its fd, still open (to fsync that inode)."""
    directory = os.path.dirname(os.path.abspath(path))
    # Per thread, not only per process: the node agent's relay writes from many threads at once.
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{_thread.get_ident()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:  # a nearly full tmpfs takes part of a write: finish it, or get ENOSPC
            view = view[os.write(fd, view):]
        if gid is not None:
            os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
        if fsync_first:
            os.fsync(fd)
        os.replace(temp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return fd


def read_small_file(path: str, limit: int = 1 << 20, follow: bool = True) -> bytes:
    """A regular file's bytes, at most `limit`. Opened non-blocking and checked before reading:
    a FIFO or a device named by a setting must fail the call, not hang it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
    return data
