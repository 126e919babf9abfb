"""What unmount needs to undo a mount, kept where only root can read it.

Layout under the state dir (0700, never the kubelet's plugin dir):
  volumes/<key>.json   one per mounted volume: its dir, the pod token's accessor, the pod
  volumes/<key>.lock   flock held while a verb works on that volume
  pending/<accessor>.json  revocations owed: ones Vault could not take yet (retried by the agent), and
                       a rotation's, which wait for the pod to take its new token (engine.rotate)
  intents/<key>.<ns>.json  a token create about to be sent (fsync'd first), dropped once its token is
                       recorded or revoked: one left behind names a token that may be alive unrecorded
  corrupt/<key>.<time>.json  records that could not be read, kept for an operator
  <name>.json          small cached facts (generator-check: is the generator token root?)

<key> is a hash of the volume dir's resolved path (bytes): every spelling of one dir (a
symlinked kubelet root, the real path) finds the same record and the same lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from .. import jsonlite, trust
from ..errors import StateFull, StateUnreadable, StateUnwritable
from . import files, volume
from .record import VolumeRecord

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (~2.5 ms) on the exec path
if TYPE_CHECKING:
    from typing import Any, Callable

try:
    # The builtin SHA-256, not hashlib's: hashlib loads _hashlib, i.e. OpenSSL's libcrypto (~2 ms of a
    # ~20 ms brokered mount at 9289bc5, python -X importtime; the digest is the same).
    from _sha256 import sha256 as _sha256
except ImportError:  # 3.12+ has it as _sha2 (and builds without it exist): hashlib's then
    try:
        from _sha2 import sha256 as _sha256
    except ImportError:
        from hashlib import sha256 as _sha256


def sha256_hex(data: bytes) -> str:
    return _sha256(data).hexdigest()

_TRUSTED_ROOTS: set[str] = set()


class StateStore:
    """The engine's Store (interfaces.py) on disk. `resolve`: how a volume dir becomes its key's path
    (the engine hands in the resolutions it made for the call)."""

    def __init__(self, root: str, resolve: Callable[[str], str] = volume.resolve):
        self.root = root
        self._resolve = resolve
        self.volumes = os.path.join(root, "volumes")
        self.pending = os.path.join(root, "pending")
        self.intents = os.path.join(root, "intents")
        self._trusted = False
        # A store lives for one verb: each volume dir is resolved, each dir made and checked, once.
        self._keys: dict[str, str] = {}
        self._ensured: set[str] = set()

    def _ensure(self, path: str) -> None:
        if path in self._ensured:
            return
        self.trust()
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if self.root not in _TRUSTED_ROOTS:  # missing when checked: in a sticky dir another user may have made it
            self._trusted = False
            self.trust()
        os.chmod(self.root, 0o700)  # records name accessors: not for other users to read
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._ensured.add(path)

    def trust(self) -> None:
        """Refuse a state dir someone else could write to, as sshd refuses such a config: a planted
        record or pending revocation would make the driver revoke a token of the planter's choosing.
        Reading creates nothing: a missing state dir is checked up to its deepest existing parent.

        A dir found trusted stays so for the process (the agent's calls skip the walk): only root
        can make a root-owned, not group/world-writable dir writable by others again."""
        if not self._trusted and self.root not in _TRUSTED_ROOTS:
            trust.check_dirs(self.root, f"state dir VAULTTMPFS_STATE_DIR={self.root} (its records decide what "
                                        "is revoked)")
            if os.path.isdir(self.root):  # a missing dir's parents were checked, not the dir we will make
                _TRUSTED_ROOTS.add(self.root)
        self._trusted = True

    def key(self, mount_dir: str) -> str:
        key = self._keys.get(mount_dir)
        if key is None:
            key = self._keys[mount_dir] = sha256_hex(os.fsencode(self._resolve(mount_dir)))[:40]
        return key

    def _volume_path(self, mount_dir: str, suffix: str) -> str:
        return os.path.join(self.volumes, self.key(mount_dir) + suffix)

    def locked(self, mount_dir: str) -> _Locked:
        """Serialise verbs on one volume (a context manager); released by the kernel even on kill -9.

        The lock file is removed only by its holder, just before it lets go, and only once the volume
        has no record; whoever waited on the removed file sees it is gone and locks the current one.
        """
        return _Locked(self, mount_dir)

    def read_volume(self, mount_dir: str) -> VolumeRecord | None:
        """The volume's record; a corrupt one is moved aside (kept for an operator) and reads as None."""
        path = self._volume_path(mount_dir, ".json")
        try:
            value = _read_json(path, strict=True)
        except ValueError:
            self._set_aside(path)
            return None
        return VolumeRecord.from_json(value) if value is not None else None

    def _set_aside(self, path: str) -> None:
        corrupt = os.path.join(self.root, "corrupt")
        os.makedirs(corrupt, mode=0o700, exist_ok=True)
        name = f"{os.path.basename(path)[:-5]}.{time.time():.0f}.json"
        os.replace(path, os.path.join(corrupt, name))

    def write_volume(self, mount_dir: str, record: VolumeRecord) -> _Durable:
        """The volume's record, in place now and durable once the result's wait() returns (a mount
        does its work meanwhile). A record torn by a crash before that reads as corrupt (see read_volume)."""
        path = self._volume_path(mount_dir, ".json")
        try:
            self._ensure(self.volumes)
            data = jsonlite.dumps({**record.to_json(), "mount_dir": os.fsdecode(mount_dir)}).encode()
            return _Durable(files.replace_then_sync(path, data, 0o600), self, "the volume's record", path)
        except OSError as exc:
            raise self.unwritable("the volume's record", path, exc) from None

    def forget_volume(self, mount_dir: str) -> None:
        # Only the record: the lock file goes when its holder releases it (see locked()).
        files.remove(self._volume_path(mount_dir, ".json"))

    def list_volumes(self) -> list[VolumeRecord]:
        """Every volume record (with `since`: when it was written), oldest first."""
        self.trust()
        names = [n for n in self._names(self.volumes) if n.endswith(".json")]
        records = []
        for name in names:
            path = os.path.join(self.volumes, name)
            record = _read_json(path)
            if record and record.get("mount_dir"):
                try:
                    records.append(VolumeRecord.from_json(record, since=os.stat(path).st_mtime))
                except FileNotFoundError:
                    pass
        return sorted(records, key=lambda r: r.since)

    def add_pending(self, accessor: str, record: dict[str, Any]) -> None:
        path = os.path.join(self.pending, _safe(accessor) + ".json")
        try:
            self._ensure(self.pending)
            _write_json(path, {"accessor": accessor, "since": time.time(), **record})
        except OSError as exc:
            raise self.unwritable("a queued revocation", path, exc) from None

    def list_pending(self) -> list[dict[str, Any]]:
        self.trust()
        names = sorted(self._names(self.pending))
        records = (_read_json(os.path.join(self.pending, n)) for n in names if n.endswith(".json"))
        return [r for r in records if r and r.get("accessor")]

    def read_pending(self, accessor: str) -> dict[str, Any] | None:
        """The queued revocation of this token as it is now (None: not queued)."""
        self.trust()
        found = _read_json(os.path.join(self.pending, _safe(accessor) + ".json"))
        return found if found and found.get("accessor") == accessor else None

    def drop_pending(self, accessor: str) -> None:
        files.remove(os.path.join(self.pending, _safe(accessor) + ".json"))

    def add_intent(self, mount_dir: str, value: dict[str, Any]) -> tuple[str, _Durable]:
        """Note a create about to be sent for `mount_dir`: its name (for drop_intent), and its fsync,
        under way meanwhile (as write_volume's). In place at once: this process dying keeps it."""
        name = f"{self.key(mount_dir)}.{time.time_ns()}"
        path = os.path.join(self.intents, name + ".json")
        what = "the note of a token create before sending it (nothing was sent to Vault)"
        try:
            self._ensure(self.intents)
            data = jsonlite.dumps({**value, "mount_dir": os.fsdecode(mount_dir), "name": name}).encode()
            return name, _Durable(files.replace_then_sync(path, data, 0o600), self, "the note of a token create", path)
        except OSError as exc:
            raise self.unwritable(what, path, exc) from None

    @staticmethod
    def intent_noted_at(name: str) -> float | None:
        """When add_intent wrote the intent of this name (time.time()), from the name it made."""
        noted = name.rpartition(".")[2]
        return int(noted) / 1e9 if noted.isdigit() else None

    def drop_intent(self, name: str) -> None:
        files.remove(os.path.join(self.intents, _safe(name) + ".json"))

    def list_intents(self, mount_dir: str | None = None) -> list[dict[str, Any]]:
        """Every intent left (oldest first), or those of one volume: creates whose token was neither
        recorded nor revoked."""
        self.trust()
        prefix = self.key(mount_dir) + "." if mount_dir is not None else ""
        names = sorted(n for n in self._names(self.intents) if n.startswith(prefix) and n.endswith(".json"))
        found = (_read_json(os.path.join(self.intents, n)) for n in names)
        return sorted((i for i in found if i and i.get("name")), key=lambda i: float(i.get("at") or 0))

    def read_note(self, name: str) -> dict[str, Any] | None:
        """A small cached fact (e.g. the generator check) in the root-only state dir."""
        self.trust()
        return _read_json(os.path.join(self.root, _safe(name) + ".json"))

    def write_note(self, name: str, value: dict[str, Any]) -> None:
        path = os.path.join(self.root, _safe(name) + ".json")
        try:
            self._ensure(self.root)
            _write_json(path, value)
        except OSError as exc:
            raise self.unwritable(f"the {name} note", path, exc) from None

    def _names(self, directory: str) -> list[str]:
        try:
            return os.listdir(directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            hint = " (vaulttmpfs' commands run as root)" if exc.errno == errno.EACCES and os.geteuid() else ""
            raise StateUnreadable(f"cannot read {directory} in the state dir {self.root} (VAULTTMPFS_STATE_DIR): "
                                  f"{exc.strerror}{hint}", exc) from None

    def unwritable(self, what: str, path: str, exc: OSError) -> StateUnwritable:
        """A failed write as the operator needs it: what, where, and (full, read-only) what to do."""
        if isinstance(exc, StateUnwritable):
            return exc
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StateFull(f"cannot write {what} to {path}: {reason}; the filesystem of the state dir "
                             f"{self.root} (VAULTTMPFS_STATE_DIR) is full: free space there", exc)
        if exc.errno == errno.EROFS:
            reason += f"; the state dir {self.root} (VAULTTMPFS_STATE_DIR) is on a read-only filesystem"
        return StateUnwritable(f"cannot write {what} to {path}: {reason}", exc)


class _Durable:
    """files.Sync whose failure (a full disk may only show at fsync) names the file, as the write's would."""

    def __init__(self, sync: files.Sync, store: StateStore, what: str, path: str):
        self._sync, self._store, self._what, self._path = sync, store, what, path

    def wait(self) -> None:
        try:
            self._sync.wait()
        except OSError as exc:
            raise self._store.unwritable(self._what, self._path, exc) from None


class _Locked:
    """StateStore.locked(): a class, not a contextlib.contextmanager (contextlib costs a kubelet call ~2.4 ms)."""

    def __init__(self, store: StateStore, mount_dir: str):
        self.store, self.mount_dir, self.fd = store, mount_dir, -1

    def __enter__(self) -> None:
        store = self.store
        path = store._volume_path(self.mount_dir, ".lock")
        try:
            store._ensure(store.volumes)
            self.fd = _lock(path)
        except OSError as exc:  # a read-only state dir fails here first
            raise store.unwritable("the volume's lock", path, exc) from None

    def __exit__(self, *_exc) -> None:
        store = self.store
        try:
            if not os.path.exists(store._volume_path(self.mount_dir, ".json")):
                files.remove(store._volume_path(self.mount_dir, ".lock"))
        finally:
            os.close(self.fd)


def _lock(path: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # The holder before us may have removed the file we waited on: lock the current one.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _safe(accessor: str) -> str:
    return "".join(c for c in accessor if c.isalnum() or c in "._-")[:128] or "unnamed"


def _read_json(path: str, strict: bool = False) -> dict[str, Any] | None:
    """None when there is no file; a file that is not a JSON object is None, or ValueError if strict."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = jsonlite.load(handle)
    except FileNotFoundError:
        return None
    except ValueError:
        if strict:
            raise
        return None
    if not isinstance(value, dict):
        if strict:
            raise ValueError(f"{path} is not a JSON object")
        return None
    return value


def _write_json(path: str, value: dict[str, Any]) -> None:
    files.replace(path, jsonlite.dumps(value).encode(), 0o600)
