"""What unmount needs to undo a mount, kept where only root can read it.

Layout under the state dir (0700, never the kubelet's plugin dir):
  volumes/<key>.json   one per mounted volume: its dir, the pod token's accessor, the pod
  volumes/<key>.lock   flock held while a verb works on that volume
  pending/<accessor>.json  revocations that failed (Vault down) and are to be retried
  <name>.json          small cached facts (generator-check: is the generator token root?)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from typing import Any, Iterator

from . import files


class StateStore:
    def __init__(self, root: str):
        self.root = root
        self.volumes = os.path.join(root, "volumes")
        self.pending = os.path.join(root, "pending")

    def _ensure(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)

    @staticmethod
    def key(mount_dir: str) -> str:
        return hashlib.sha256(os.path.normpath(mount_dir).encode()).hexdigest()[:40]

    def _volume_path(self, mount_dir: str, suffix: str) -> str:
        return os.path.join(self.volumes, self.key(mount_dir) + suffix)

    @contextlib.contextmanager
    def locked(self, mount_dir: str) -> Iterator[None]:
        """Serialise verbs on one volume; released by the kernel even on kill -9."""
        self._ensure(self.volumes)
        path = self._volume_path(mount_dir, ".lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # forget_volume() may have unlinked the file we waited on: lock the current one.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)

    def read_volume(self, mount_dir: str) -> dict[str, Any] | None:
        return _read_json(self._volume_path(mount_dir, ".json"))

    def write_volume(self, mount_dir: str, record: dict[str, Any]) -> None:
        self._ensure(self.volumes)
        _write_json(self._volume_path(mount_dir, ".json"), {"mount_dir": mount_dir, **record})

    def forget_volume(self, mount_dir: str) -> None:
        for suffix in (".json", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._volume_path(mount_dir, suffix))

    def list_volumes(self) -> list[dict[str, Any]]:
        """Every volume record (with `since`: when it was written), oldest first."""
        try:
            names = [n for n in os.listdir(self.volumes) if n.endswith(".json")]
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            path = os.path.join(self.volumes, name)
            record = _read_json(path)
            if record and record.get("mount_dir"):
                with contextlib.suppress(FileNotFoundError):
                    records.append({**record, "since": os.stat(path).st_mtime})
        return sorted(records, key=lambda r: r["since"])

    def add_pending(self, accessor: str, record: dict[str, Any]) -> None:
        self._ensure(self.pending)
        _write_json(os.path.join(self.pending, _safe(accessor) + ".json"),
                    {"accessor": accessor, "since": time.time(), **record})

    def list_pending(self) -> list[dict[str, Any]]:
        try:
            names = sorted(os.listdir(self.pending))
        except FileNotFoundError:
            return []
        records = (_read_json(os.path.join(self.pending, n)) for n in names if n.endswith(".json"))
        return [r for r in records if r and r.get("accessor")]

    def drop_pending(self, accessor: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.pending, _safe(accessor) + ".json"))

    def read_note(self, name: str) -> dict[str, Any] | None:
        """A small cached fact (e.g. the generator check) in the root-only state dir."""
        return _read_json(os.path.join(self.root, _safe(name) + ".json"))

    def write_note(self, name: str, value: dict[str, Any]) -> None:
        self._ensure(self.root)
        _write_json(os.path.join(self.root, _safe(name) + ".json"), value)


def _safe(accessor: str) -> str:
    return "".join(c for c in accessor if c.isalnum() or c in "._-")[:128] or "unnamed"


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: str, value: dict[str, Any]) -> None:
    files.replace(path, json.dumps(value).encode(), 0o600)
