"""The pod's volume on disk: a small tmpfs and the files in it. Knows nothing of Vault or the kubelet.

mount(2)/umount2(2) are called directly (ctypes' _ctypes) rather than through /bin/mount: no child
process can keep the kubelet's pipes open, and it saves an exec per call.
"""

from __future__ import annotations

import _ctypes  # ctypes' C half: two libc calls need neither ctypes' Python half nor its ~1 ms of import
import errno
import os
import stat
import sys

from ..errors import DriverError
from . import files

# The bundle keeps ctypes' Python half where PyInstaller's bootstrap cannot import it (build.spec:
# LATE_DIR): its ctypes hook imports ctypes on every start when it can (~1.4 ms of each `init`).
# Nothing of ours imports it; for a dependency that does, it is found last on the path.
LATE_DIR = "late-imports"
if getattr(sys, "frozen", False):
    sys.path.append(os.path.join(sys._MEIPASS, LATE_DIR))

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MNT_DETACH = 2
MOUNT_SOURCE = "vaulttmpfs"  # the tmpfs "device" name: how we recognise our own mounts
_SOURCE = MOUNT_SOURCE.encode()
_libc = None


class _Int(_ctypes._SimpleCData):  # ctypes.c_int
    _type_ = "i"


class _LibcFunction(_ctypes.CFuncPtr):  # what ctypes.CDLL(None, use_errno=True).<name> is
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _Libc:
    """libc's mount(2) and umount2(2), as ctypes.CDLL(None, use_errno=True) has them (bytes are char *,
    None is NULL, ints are int; errno kept for get_errno)."""

    def __init__(self):
        self._handle = _ctypes.dlopen(None, os.RTLD_NOW)
        self.mount = _LibcFunction(("mount", self))
        self.umount2 = _LibcFunction(("umount2", self))


def _sys() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mounts() -> list[dict[str, str]]:
    """Every mount this mount namespace shows (target, fstype, source, options, dev), mountinfo's
    octal escapes decoded over bytes: a path with a space or non-UTF-8 bytes reads as on disk."""
    with open("/proc/self/mountinfo", "rb") as table:
        return [_entry(line.split()) for line in table]


def _entry(fields: list[bytes]) -> dict[str, str]:
    sep = fields.index(b"-")
    return {"target": os.fsdecode(_unescape(fields[4])), "fstype": os.fsdecode(fields[sep + 1]),
            "source": os.fsdecode(_unescape(fields[sep + 2])), "options": os.fsdecode(fields[5]),
            "dev": os.fsdecode(fields[2])}


def resolve(path: str) -> str:
    """os.path.realpath(path), from the kernel when the path exists: two syscalls, not an lstat and
    a Python loop per component (this runs several times in every call the agent serves)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        head, leaf = os.path.split(path)
        # A missing last component (a CSI target before the plugin makes it) is joined as realpath joins it.
        if leaf not in ("", ".", "..") and head != path and not os.path.lexists(path):
            return os.path.join(resolve(head), leaf)
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.realpath(path)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = ""
    finally:
        os.close(fd)
    # Not a path (no /proc; an unreachable or deleted dir): the library's answer.
    return real if real.startswith("/") and not real.endswith(" (deleted)") else os.path.realpath(path)


def mount_info(real_path: str) -> dict[str, str] | None:
    """The /proc/self/mountinfo entry mounted exactly at `real_path` (resolved: see resolve()), if any
    (last one wins)."""
    # Only lines holding the path as mountinfo writes it are parsed: a node has hundreds of mounts.
    target = _escape(os.fsencode(real_path))
    needle = b" " + target + b" "
    found = None
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table.read().splitlines():
            if needle in line:
                fields = line.split()
                if fields[4] == target:
                    found = fields
    return _entry(found) if found else None


def _escape(path: bytes) -> bytes:
    for char in b"\\ \t\n":  # backslash first: the escapes added after it hold one
        path = path.replace(bytes([char]), b"\\%03o" % char)
    return path


def _unescape(field: bytes) -> bytes:
    # mountinfo escapes space, tab, newline and backslash as \ooo; every other byte is as it is on disk.
    if b"\\" not in field:
        return field
    import re

    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def is_mount_point(path: str) -> bool:
    """os.path.ismount's test (another device than its parent's, or the root) without its realpath()
    of the parent: the kernel resolves `path/..` itself."""
    try:
        here = os.lstat(path)
        if stat.S_ISLNK(here.st_mode):
            return False
        parent = os.lstat(os.path.join(path, ".."))
    except (OSError, ValueError):
        return False
    return here.st_dev != parent.st_dev or here.st_ino == parent.st_ino


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


def parts_below(path: str, root: str, real_path: str | None = None) -> list[str] | None:
    """`path`'s components below `root` once symlinks are resolved; None if it is not below it.

    `root` itself may be a symlink (a kubelet root moved to another disk); nothing below it may
    be: the components must read the same before and after resolving. `real_path`: `path` resolved
    already by the caller.
    """
    rel = os.path.relpath(real_path or resolve(path), resolve(root))
    if rel == "." or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    parts = rel.split(os.sep)
    return parts if os.path.normpath(path).split(os.sep)[-len(parts):] == parts else None


def open_dir(path: str) -> int:
    """An O_PATH handle on the directory `path` names right now (not a symlink to one)."""
    try:
        return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise DriverError(f"mount dir {path}: {exc.strerror}") from None


def mount_tmpfs(path: str, real_path: str, size: str, gid: int | None) -> None:
    """A private, non-executable tmpfs on the dir `path` names, which must resolve to `real_path`.

    The check and the mount use one handle on the dir (mount(2) on /proc/self/fd/N), so a symlink
    swapped into the path after the check cannot move the mount somewhere else.
    """
    mode = "0750" if gid is not None else "0700"
    options = f"size={size},mode={mode},uid=0,gid={gid if gid is not None else 0}"
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    fd = open_dir(path)
    try:
        handle = f"/proc/self/fd/{fd}"
        if os.readlink(handle) != real_path:
            raise DriverError(f"mount dir {path} now resolves to {os.readlink(handle)}, not {real_path}: "
                              "a path component was swapped for a symlink; refusing to mount")
        result = _sys().mount(_SOURCE, handle.encode(), b"tmpfs", flags, options.encode())
        try:
            _check(result, f"mounting tmpfs at {path}")
        except OSError as exc:
            raise DriverError(str(exc)) from None
    finally:
        os.close(fd)


def opened_mount(path: str, real_path: str) -> _OpenedMount:
    """A context manager: a path (/proc/self/fd/N) to the root of the tmpfs just mounted at `path`, checked
    to be ours and to sit at `real_path`: the files go there even if `path` is swapped for a symlink meanwhile."""
    return _OpenedMount(path, real_path)


class _OpenedMount:
    """A class, not a contextlib.contextmanager: contextlib costs a kubelet call ~2.4 ms."""

    def __init__(self, path: str, real_path: str):
        self.path, self.real_path, self.fd = path, real_path, -1

    def __enter__(self) -> str:
        path, real_path = self.path, self.real_path
        fd = open_dir(path)
        try:
            dev = os.fstat(fd).st_dev
            entry = mount_info(real_path)
            if (os.readlink(f"/proc/self/fd/{fd}") != real_path or not entry or entry["source"] != MOUNT_SOURCE
                    or entry["dev"] != f"{os.major(dev)}:{os.minor(dev)}"):
                raise DriverError(f"mount dir {path} no longer leads to the tmpfs just mounted at {real_path}; "
                                  "refusing to write the token")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return f"/proc/self/fd/{fd}"

    def __exit__(self, *_exc) -> None:
        os.close(self.fd)


def remount_readonly(path: str) -> None:
    flags = MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(_sys().mount(_SOURCE, os.fsencode(path), b"tmpfs", flags, None), f"remounting {path} read-only")


def remount_writable(path: str) -> None:
    """For a rotation's new files (engine.rotate), remounted read-only again right after."""
    flags = MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(_sys().mount(_SOURCE, os.fsencode(path), b"tmpfs", flags, None), f"remounting {path} read-write")


def unmount(path: str) -> None:
    """Unmount; a busy mount is detached lazily so a stuck process cannot keep the pod Terminating."""
    result = _sys().umount2(os.fsencode(path), 0)
    if result != 0:
        err = _ctypes.get_errno()
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


read_small_file = files.read_small_file  # the filesystem interface's (interfaces.Filesystem)
