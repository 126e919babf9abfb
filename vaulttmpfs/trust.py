"""Is a path one only root can change? sshd's secure_filename(), walked the way the kernel walks it.

A root-owned, 0600 file is worth nothing if another user can rename a directory above it, or a
symlink on the way to it, and put their own in its place. Resolving the path first and checking
the result (realpath) misses exactly that: the directory holding the symlink is never looked at.
So the path is walked as given, from / down, one component at a time, with lstat:

- every directory on the way must be owned by root and not group/world-writable; a root-owned
  sticky one (/tmp) may be world-writable: others can add entries there, not rename or remove root's;
- a symlink is followed and its target walked the same way (from / when absolute), at most
  MAX_SYMLINKS of them (the kernel's limit; a loop ends there). A symlink is as trusted as the
  directory holding it, except that in a sticky directory others can write to, only a root-owned
  one is followed: its owner may remove it and plant another (the kernel's fs.protected_symlinks
  rule). Its owner cannot change it in place, and its mode means nothing;
- where a name is to be read or created (a file's own directory; a directory checked for itself),
  that directory may not be writable by others even when sticky: they could create the name first;
- a `..` in the path given is refused: os.path folds it away by spelling, the kernel after whatever
  symlink comes before it, and the two could name different files.

A file is then opened by the resolved path with O_NOFOLLOW and must be the inode the walk found:
every entry on that path is one only root can change, so nothing can be swapped in between.
"""

from __future__ import annotations

import os
import stat

from .errors import DriverError

MAX_SYMLINKS = 40  # as the kernel's path lookup (ELOOP beyond)


class _Walked:  # a plain class: typing.NamedTuple costs ~2.5 ms to load, collections' ~1.5
    __slots__ = ("directory", "info", "leaf", "leaf_info", "missing")

    def __init__(self, directory: str, info: os.stat_result, leaf: str | None, leaf_info: os.stat_result | None,
                 missing: tuple[str, ...]):
        self.directory = directory  # the last directory reached, resolved; every directory above it checked
        self.info = info
        self.leaf = leaf  # the resolved path of a non-directory that ends the path
        self.leaf_info = leaf_info
        self.missing = missing  # the components from the first that does not exist


def check_dirs(path: str, what: str, strict_leaf: bool = True) -> None:
    """Refuse unless `path` (a directory; its missing tail is skipped) and every directory and symlink
    on the way to it, as given, are root's.

    strict_leaf: `path` itself, when it exists, may not be writable by others even when sticky (a
    file is to be created or read there, by name).
    """
    walked = _walk(path, what)
    if walked.leaf:
        raise DriverError(f"{what}: {walked.leaf} is not a directory")
    if strict_leaf and not walked.missing:
        _check_dir(walked.directory, walked.info, what, sticky_ok=False)


def check_parent(path: str, what: str) -> None:
    """check_dirs on the directory the file `path` is in, spelled as given (os.path.abspath would fold a `..`)."""
    _refuse_dotdot(path, what)
    check_dirs(os.path.dirname(path) or ".", what)


def open_file(path: str, what: str, flags: int = os.O_RDONLY) -> int:
    """An fd on the file at `path`, once every directory and symlink on the way to it is root's.

    OSError (FileNotFoundError for a missing file) when it cannot be opened; DriverError when untrusted.
    """
    walked = _walk(path, what)
    if walked.missing:
        raise FileNotFoundError(2, os.strerror(2), path)
    _check_dir(walked.directory, walked.info, what, sticky_ok=False)
    target, expected = (walked.leaf, walked.leaf_info) if walked.leaf else (walked.directory, walked.info)
    fd = os.open(target, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (expected.st_dev, expected.st_ino):
        os.close(fd)  # root changed it meanwhile: no one else can
        raise DriverError(f"{what}: {target} changed while it was being checked; try again")
    return fd


def _walk(path: str, what: str) -> _Walked:
    _refuse_dotdot(path, what)
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)
    pending = _components(path)
    directory, info = "/", _lstat("/", what)
    _check_dir(directory, info, what, sticky_ok=True)
    followed = 0
    while pending:
        name = pending.pop(0)
        if name == "..":  # from a symlink's target: the parent of where the walk is, as the kernel takes it
            directory = os.path.dirname(directory)
            info = _lstat(directory, what)  # checked on the way down
            continue
        child = os.path.join(directory, name)
        try:
            child_info = os.lstat(child)
        except FileNotFoundError:
            return _Walked(directory, info, None, None, (name, *pending))
        except OSError as exc:
            raise DriverError(f"{what}: cannot check {child}: {exc.strerror}") from None
        if stat.S_ISLNK(child_info.st_mode):
            _check_link(child, child_info, directory, info, what)
            followed += 1
            if followed > MAX_SYMLINKS:
                raise DriverError(f"{what}: more than {MAX_SYMLINKS} symlinks on the way (a loop?), "
                                  f"the last {child}")
            target = os.readlink(child)
            if target.startswith("/"):
                directory, info = "/", _lstat("/", what)
            pending[:0] = _components(target)
        elif stat.S_ISDIR(child_info.st_mode):
            _check_dir(child, child_info, what, sticky_ok=True)
            directory, info = child, child_info
        elif pending:
            raise DriverError(f"{what}: {child} is not a directory")
        else:
            return _Walked(directory, info, child, child_info, ())
    return _Walked(directory, info, None, None, ())


def _refuse_dotdot(path: str, what: str) -> None:
    if ".." in path.split("/"):
        raise DriverError(f"{what}: {path} has a `..` in it; give the path without one")


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _lstat(path: str, what: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise DriverError(f"{what}: cannot check {path}: {exc.strerror}") from None


def _check_dir(path: str, info: os.stat_result, what: str, sticky_ok: bool) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise DriverError(f"{what}: {path} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    shared = mode & 0o022 and not (sticky_ok and mode & stat.S_ISVTX)
    if info.st_uid != 0 or shared:
        raise DriverError(
            f"{what}: directory {path} is not trusted (owner uid {info.st_uid}, mode {mode:04o}): every directory "
            "on the way to a file root acts on must be owned by root and not group/world-writable (as sshd "
            f"requires); fix it with: chown root {path} && chmod go-w {path}"
        )


def _check_link(link: str, info: os.stat_result, directory: str, dir_info: os.stat_result, what: str) -> None:
    # _check_dir let `directory` through: writable by others only if root-owned and sticky.
    if dir_info.st_mode & 0o022 and info.st_uid != 0:
        raise DriverError(
            f"{what}: symlink {link} is owned by uid {info.st_uid} in {directory} (mode "
            f"{stat.S_IMODE(dir_info.st_mode):04o}), which others can write to: there only root's symlinks are "
            f"followed (as the kernel's protected_symlinks); fix it with: rm {link} (or, if its target is right, "
            f"chown -h root {link})"
        )
