"""The pod's volume on disk: a small tmpfs and the files in it. Knows nothing of Vault or the kubelet.

mount(2)/umount2(2) are called directly (ctypes) rather than through /bin/mount: no child
process can keep the kubelet's pipes open, and it saves an exec per call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from . import files
from ..errors import DriverError

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MNT_DETACH = 2
_libc = None


def _sys():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount_info(path: str) -> dict[str, str] | None:
    """The /proc/self/mountinfo entry mounted exactly at `path`, if any (last one wins)."""
    found = None
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as table:
        for line in table:
            fields = line.split()
            mount_point = _unescape(fields[4])
            if mount_point == target:
                sep = fields.index("-")
                found = {"fstype": fields[sep + 1], "source": fields[sep + 2], "options": fields[5]}
    return found


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def is_mount_point(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def check_target(path: str) -> None:
    """The kubelet's volume dir: absolute, a real directory (not a symlink), ours to mount on."""
    if not os.path.isabs(path):
        raise DriverError(f"mount dir {path!r} is not an absolute path")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise DriverError(f"mount dir {path} does not exist") from None
    if stat.S_ISLNK(info.st_mode):
        raise DriverError(f"mount dir {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(info.st_mode):
        raise DriverError(f"mount dir {path} is not a directory")


def parts_below(path: str, root: str) -> list[str] | None:
    """`path`'s components below `root` once symlinks are resolved; None if it is not below it.

    `root` itself may be a symlink (a kubelet root moved to another disk); nothing below it may
    be: the components must read the same before and after resolving.
    """
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    if rel == "." or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    parts = rel.split(os.sep)
    return parts if os.path.normpath(path).split(os.sep)[-len(parts):] == parts else None


def mount_tmpfs(path: str, size: str, gid: int | None) -> None:
    """A private, non-executable tmpfs: root-only, or group-readable by the pod's fsGroup."""
    mode = "0750" if gid is not None else "0700"
    options = f"size={size},mode={mode},uid=0,gid={gid if gid is not None else 0}"
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    result = _sys().mount(b"vaulttmpfs", os.fsencode(path), b"tmpfs", flags, options.encode())
    try:
        _check(result, f"mounting tmpfs at {path}")
    except OSError as exc:
        raise DriverError(str(exc)) from None


def remount_readonly(path: str) -> None:
    flags = MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(_sys().mount(b"vaulttmpfs", os.fsencode(path), b"tmpfs", flags, None), f"remounting {path} read-only")


def unmount(path: str) -> None:
    """Unmount; a busy mount is detached lazily so a stuck process cannot keep the pod Terminating."""
    result = _sys().umount2(os.fsencode(path), 0)
    if result != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL and not is_mount_point(path):
            return  # already unmounted
        if err != errno.EBUSY:
            raise OSError(err, f"unmounting {path}: {os.strerror(err)}")
        _check(_sys().umount2(os.fsencode(path), MNT_DETACH), f"detaching {path}")


def write_file(directory: str, name: str, data: bytes, mode: int, gid: int | None) -> None:
    """Write atomically: a reader sees the whole file or none of it, never a partial token."""
    files.replace(os.path.join(directory, name), data, mode, gid if gid is not None else 0, durable=False)


def holds_files(directory: str, names: list[str]) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in names)
