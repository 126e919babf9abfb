"""Put the driver bundle where the kubelet looks for it, without the kubelet ever seeing half of it.

The kubelet watches its plugin dir and re-probes a driver whenever a file whose name does not
start with "." changes. So the layout is:

  <plugin-dir>/cloudwatt~vaulttmpfs/
      vaulttmpfs                -> .vaulttmpfs-<hash>/vaulttmpfs   (relative symlink: the only non-dot name)
      .vaulttmpfs-<hash>/       a complete onedir bundle (executable + .vaulttmpfs-lib/)
      .vaulttmpfs-<old hash>/   the previous bundle, kept for calls still running from it

A bundle is copied into a dot-named staging dir, checked with `init`, moved in under its dot
name, and only then does the `vaulttmpfs` link change, by rename (atomic). The PyInstaller
bootloader finds its bundle through /proc/self/exe, so it runs fine through the symlink.
Filesystem only: no kubelet protocol, no Vault.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from ..engine import files, trust
from ..errors import DriverError

DEFAULT_PLUGIN_DIR = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"
DRIVER_DIR = "cloudwatt~vaulttmpfs"
EXE = "vaulttmpfs"
BUNDLE_PREFIX = f".{EXE}-"
BUNDLE_NAME = re.compile(rf"^\.{EXE}-[0-9a-f]{{16}}$")
STAGING = ".vaulttmpfs-install.tmp"  # in the plugin dir: same filesystem, so renames are atomic
LOCK = ".vaulttmpfs-install.lock"
LINK_TEMP = f".{EXE}.tmp"
VERIFY_TIMEOUT = 60.0


class InstallError(DriverError):
    """The install could not be done; the driver the kubelet sees was left as it was."""


def default_source() -> str:
    """The bundle we are running from when frozen; the repo's build otherwise."""
    if getattr(sys, "frozen", False):
        return os.path.dirname(os.path.realpath(sys.executable))
    return str(Path(__file__).resolve().parents[2] / "dist" / EXE)


def bundle_hash(source: str) -> str:
    """Content hash of a bundle: names, file modes' exec bits, contents and symlink targets."""
    digest = hashlib.sha256()
    for path in sorted(_walk(source)):
        full = os.path.join(source, path)
        info = os.lstat(full)
        digest.update(path.encode() + b"\0")
        if stat.S_ISLNK(info.st_mode):
            digest.update(b"L" + os.readlink(full).encode())
        elif stat.S_ISDIR(info.st_mode):
            digest.update(b"D")
        else:
            digest.update(b"X" if info.st_mode & 0o111 else b"F")
            with open(full, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _walk(root: str):
    for parent, dirs, names in os.walk(root):
        for name in dirs + names:
            yield os.path.relpath(os.path.join(parent, name), root)


def check_source(source: str) -> None:
    exe = os.path.join(source, EXE)
    if not os.path.isfile(exe) or os.path.islink(exe) or not os.access(exe, os.X_OK):
        raise InstallError(f"{source} is not a vaulttmpfs bundle: no executable {EXE} in it (run `make build`)")


def verify(exe: str) -> dict:
    """Run `<exe> init` as the kubelet would; its whole output must be one Success object."""
    try:
        proc = subprocess.run([exe, "init"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=VERIFY_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{exe} init could not run: {exc}") from None
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or reply.get("status") != "Success" or proc.returncode != 0:
        output = proc.stdout.decode(errors="replace").strip()[-500:]
        raise InstallError(f"{exe} init failed (exit {proc.returncode}): {output!r}")
    return reply


def current_bundle(driver_dir: str) -> str | None:
    """The bundle dir name the `vaulttmpfs` link points into, if it is one of ours."""
    try:
        target = os.readlink(os.path.join(driver_dir, EXE))
    except OSError:
        return None
    parts = target.split("/")
    if len(parts) == 2 and BUNDLE_NAME.match(parts[0]) and parts[1] == EXE:
        return parts[0]
    return None


def install(plugin_dir: str, source: str) -> dict:
    """Install or upgrade; the same bundle twice changes nothing on disk (no kubelet re-probe)."""
    source = os.path.realpath(source)
    check_source(source)
    digest = bundle_hash(source)
    bundle = BUNDLE_PREFIX + digest[:16]
    os.makedirs(plugin_dir, mode=0o755, exist_ok=True)
    _check_plugin_dir(plugin_dir)
    driver_dir = os.path.join(plugin_dir, DRIVER_DIR)
    exe = os.path.join(driver_dir, EXE)
    with _locked(plugin_dir):
        _secure_driver_dir(driver_dir)
        previous = current_bundle(driver_dir)
        intact = _intact(os.path.join(driver_dir, bundle), digest)
        if previous == bundle and intact and _root_only(exe):
            verify(exe)
            return {"action": "unchanged", "bundle": bundle, "path": exe, "pruned": []}
        staging = os.path.join(plugin_dir, STAGING)
        _remove(staging)
        os.mkdir(staging, 0o755)
        try:
            action = _place(source, staging, driver_dir, bundle, intact)
            verify(exe)
            pruned = _prune(driver_dir, staging, keep={bundle, previous})
        finally:
            _remove(staging)
    return {"action": action, "bundle": bundle, "path": exe, "pruned": pruned}


def _intact(bundle_dir: str, digest: str) -> bool:
    """The bundle is there, unchanged, and nobody but root can change it (else it is copied anew)."""
    if not os.path.isdir(bundle_dir) or os.path.islink(bundle_dir):
        return False
    paths = [bundle_dir, *(os.path.join(bundle_dir, p) for p in _walk(bundle_dir))]
    return all(_root_only(p) for p in paths) and bundle_hash(bundle_dir) == digest


def _root_only(path: str) -> bool:
    """Owned by root and (unless a symlink, whose mode means nothing) not group/world-writable."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return info.st_uid == 0 and (stat.S_ISLNK(info.st_mode) or not info.st_mode & 0o022)


def _check_plugin_dir(plugin_dir: str) -> None:
    # The kubelet's dir, not ours to chmod: whoever can write it can replace our driver dir.
    try:
        trust.check_dirs(plugin_dir, "plugin dir")
    except DriverError as exc:
        raise InstallError(f"{exc}; the kubelet runs what is in it as root, so nothing was installed") from None


def _secure_driver_dir(driver_dir: str) -> None:
    """The kubelet execs what is in here as root: root-owned, writable by root only, every time
    (an upgrade must not keep a dir someone loosened). Changed only when wrong (a chmod is an event
    the kubelet's watcher would see)."""
    try:
        info = os.lstat(driver_dir)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise InstallError(f"{driver_dir} is not a directory; remove it by hand (`rm {driver_dir}`), "
                           "vaulttmpfs will not")
    if info.st_uid != 0 or info.st_gid != 0:
        os.chown(driver_dir, 0, 0)
    if info.st_mode & 0o022:
        os.chmod(driver_dir, stat.S_IMODE(info.st_mode) & ~0o022)


def _place(source: str, staging: str, driver_dir: str, bundle: str, intact: bool) -> str:
    installed = os.path.join(driver_dir, bundle)
    staged = os.path.join(staging, bundle)
    if intact:
        verify(os.path.join(installed, EXE))  # e.g. going back to the previous version
    else:
        _copy_bundle(source, staged)
        verify(os.path.join(staged, EXE))  # before the kubelet can see it
    if not os.path.isdir(driver_dir):
        # First install: build the whole driver dir under a dot name, then one rename shows it complete.
        fresh = os.path.join(staging, DRIVER_DIR)
        os.mkdir(fresh, 0o755)
        os.rename(staged, os.path.join(fresh, bundle))
        os.symlink(f"{bundle}/{EXE}", os.path.join(fresh, EXE))
        files.fsync_dir(fresh)
        os.rename(fresh, driver_dir)
        files.fsync_dir(os.path.dirname(driver_dir))
        return "installed"
    exe = os.path.join(driver_dir, EXE)
    if os.path.isdir(exe) and not os.path.islink(exe):
        raise InstallError(f"{exe} is a directory; remove it by hand, vaulttmpfs will not")
    if not intact:
        if os.path.lexists(installed):  # a damaged copy of this very bundle: repaired in two renames
            os.rename(installed, os.path.join(staging, "damaged-" + bundle))
        os.rename(staged, installed)
    link = os.path.join(driver_dir, LINK_TEMP)
    _remove(link)
    os.symlink(f"{bundle}/{EXE}", link)
    os.rename(link, exe)  # the one change the kubelet sees
    files.fsync_dir(driver_dir)
    return "upgraded"


def _copy_bundle(source: str, dest: str) -> None:
    shutil.copytree(source, dest, symlinks=True)
    # The kubelet runs this as root: nobody else may be able to change it.
    for path in [dest, *(os.path.join(dest, p) for p in _walk(dest))]:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            continue
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o022)
        if stat.S_ISREG(info.st_mode):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for parent, _dirs, _files in os.walk(dest):
        files.fsync_dir(parent)


def _prune(driver_dir: str, staging: str, keep: set) -> list[str]:
    """Old bundles go, except the current one and the previous one (calls may still run from it)."""
    pruned = []
    for name in sorted(os.listdir(driver_dir)):
        if name in keep or not (BUNDLE_NAME.match(name) or name == LINK_TEMP):
            continue
        # Moved out first, so a half-deleted bundle never sits under a bundle name.
        trash = os.path.join(staging, "trash-" + name)
        os.rename(os.path.join(driver_dir, name), trash)
        _remove(trash)
        pruned.append(name)
    return pruned


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


@contextlib.contextmanager
def _locked(plugin_dir: str):
    """Two installers on one node (a rollout overlapping a restart) take turns."""
    fd = os.open(os.path.join(plugin_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
