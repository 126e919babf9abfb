"""Test doubles for the engine's collaborators (vaulttmpfs/engine/interfaces.py), for the in-process
tests only (test_engine_unit.py): an in-memory store (csi-lib's storage/memory.go), a filesystem that
mounts nothing and a Vault double. The integration suite runs the real ones: OpenBao, tmpfs, the kubelet's calls.

Each double writes what it did into one shared Journal, so a test reads the order of the steps and
of their undo; `journal.fail_at` makes the named step raise instead of happening.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from typing import Any, Iterator

from vaulttmpfs.engine import volume
from vaulttmpfs.engine.record import VolumeRecord
from vaulttmpfs.errors import DriverError, TokenNotWrapped, VaultUnavailable


class Injected(DriverError):
    """The failure a test asked for (journal.fail_at)."""


class Journal:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.fail_at: str | None = None
        self.fail_with: Exception | None = None  # what fail_at raises (default: Injected)

    def step(self, name: str, *detail: str) -> None:
        if name == self.fail_at:
            raise self.fail_with or Injected(f"injected failure at {name}")
        self.events.append((name, *detail))

    def names(self) -> list[str]:
        return [event[0] for event in self.events]


class _Written:
    def wait(self) -> None:
        pass


class MemoryStore:
    """Records, locks and the revocation queue in dicts (engine.interfaces.Store)."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.volumes: dict[str, VolumeRecord] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, dict[str, Any]] = {}
        self.intents: dict[str, dict[str, Any]] = {}  # creates noted before they were sent, not yet settled
        self.held: set[str] = set()  # volumes whose lock is held right now
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def locked(self, mount_dir: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(mount_dir, threading.Lock())
        with lock:
            self.held.add(mount_dir)
            self.journal.step("lock", mount_dir)
            try:
                yield
            finally:
                self.journal.events.append(("unlock", mount_dir))
                self.held.discard(mount_dir)

    def read_volume(self, mount_dir: str) -> VolumeRecord | None:
        return self.volumes.get(mount_dir)

    def write_volume(self, mount_dir: str, record: VolumeRecord) -> _Written:
        self.journal.step("write record", mount_dir)
        self.volumes[mount_dir] = record.replace(mount_dir=mount_dir)
        return _Written()

    def forget_volume(self, mount_dir: str) -> None:
        self.journal.step("forget record", mount_dir)
        self.volumes.pop(mount_dir, None)

    def list_volumes(self) -> list[VolumeRecord]:
        return list(self.volumes.values())

    def add_pending(self, accessor: str, record: dict[str, Any]) -> None:
        self.journal.step("queue revocation", accessor)
        self.pending[accessor] = {"accessor": accessor, **record}

    def drop_pending(self, accessor: str) -> None:
        self.pending.pop(accessor, None)

    def list_pending(self) -> list[dict[str, Any]]:
        return list(self.pending.values())

    def read_pending(self, accessor: str) -> dict[str, Any] | None:
        return self.pending.get(accessor)

    def add_intent(self, mount_dir: str, value: dict[str, Any]) -> tuple[str, _Written]:
        name = f"intent-{len(self.intents) + len(self.notes)}-{mount_dir}"
        self.intents[name] = {**value, "mount_dir": mount_dir, "name": name}
        return name, _Written()

    def drop_intent(self, name: str) -> None:
        self.intents.pop(name, None)

    def list_intents(self, mount_dir: str | None = None) -> list[dict[str, Any]]:
        return [i for i in self.intents.values() if mount_dir in (None, i["mount_dir"])]

    def read_note(self, name: str) -> dict[str, Any] | None:
        return self.notes.get(name)

    def write_note(self, name: str, value: dict[str, Any]) -> None:
        self.notes[name] = value


class FakeFilesystem:
    """Mounts as entries in a dict, files in memory (engine.interfaces.Filesystem). The kubelet's dirs
    are real dirs under the test's tmp_path: the path checks and resolve() are the real ones."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.mounts: dict[str, dict[str, bytes]] = {}  # real path -> its files
        self.read_only: set[str] = set()
        self.foreign: set[str] = set()  # someone else's mounts
        self.resolved: list[str] = []  # every resolve() the engine asked for

    @staticmethod
    def _key(path: str) -> str:
        return os.path.realpath(path)

    def check_target(self, path: str) -> None:
        volume.check_target(path)

    def resolve(self, path: str) -> str:
        self.resolved.append(path)
        return volume.resolve(path)

    def is_mount_point(self, path: str) -> bool:
        return self._key(path) in self.mounts or self._key(path) in self.foreign

    def mount_info(self, real_path: str) -> dict[str, str] | None:
        key = self._key(real_path)
        if key in self.foreign:
            return {"target": key, "fstype": "ext4", "source": "/dev/sda1", "options": "rw", "dev": "8:1"}
        if key in self.mounts:
            return {"target": key, "fstype": "tmpfs", "source": volume.MOUNT_SOURCE, "options": "rw", "dev": "0:99"}
        return None

    def mount_tmpfs(self, path: str, real_path: str, size: str, gid: int | None) -> None:
        self.journal.step("mount tmpfs", path)
        self.mounts[self._key(real_path)] = {}

    @contextlib.contextmanager
    def opened_mount(self, path: str, real_path: str) -> Iterator[str]:
        self.journal.step("open tmpfs", path)
        yield self._key(real_path)

    def write_file(self, directory: str, name: str, data: bytes, mode: int, gid: int | None) -> None:
        self.journal.step(f"write {name}", directory)
        self.mounts[directory][name] = data

    def remount_readonly(self, path: str) -> None:
        self.journal.step("remount read-only", path)
        self.read_only.add(path)

    def unmount(self, path: str) -> None:
        self.journal.step("unmount", path)
        self.mounts.pop(self._key(path), None)

    def holds_files(self, directory: str, names: list[str]) -> bool:
        files = self.mounts.get(self._key(directory), {})
        return all(name in files for name in names)

    def read_small_file(self, path: str, limit: int = 1 << 20, follow: bool = True) -> bytes:
        files = self.mounts.get(self._key(os.path.dirname(path)))
        if files is None:
            return volume.read_small_file(path, limit, follow)
        try:
            return files[os.path.basename(path)]
        except KeyError:
            raise FileNotFoundError(path) from None


class VaultDouble:
    """Stands in for vault.client.Vault in the in-process tests only: tokens are entries in a dict.
    Called as the engine's VaultFactory (config, token) -> client; every client shares this state."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.alive: set[str] = set()  # accessors of live tokens
        self.generator_policies = ["token_generator"]
        self.unreachable = False  # revocations fail as with Vault down
        self.strip_wrapping = False  # answer a plain token where a wrapped one was asked for
        self.tokens_used: list[str | None] = []
        self.created: list[tuple[dict[str, str], str]] = []  # each create's (metadata, display_name)
        self._ids = itertools.count(1)

    def __call__(self, config, token: str | None) -> VaultDouble:
        self.tokens_used.append(token)
        return self

    def _new(self, kind: str) -> str:
        accessor = f"{kind}-{next(self._ids)}"
        self.alive.add(accessor)
        return accessor

    def _wrap(self) -> dict[str, Any]:
        if self.strip_wrapping:
            raise TokenNotWrapped("creating a token: Vault returned a plain token", self._new("pod"))
        pod, wrapping = self._new("pod"), self._new("wrapping")
        return {"token": f"s.{wrapping}", "accessor": wrapping, "wrapped_accessor": pod, "ttl": 300,
                "creation_path": "auth/token/create/applications"}

    def create_wrapped_token(self, role: str, policies: list[str], metadata: dict[str, str],
                             display_name: str, volume: tuple[str, str] | None = None) -> dict[str, Any]:
        self.journal.step("create token", role, ",".join(policies))
        self.created.append((metadata, display_name))
        return self._wrap()

    def create_token(self, role: str, policies: list[str], metadata: dict[str, str],
                     display_name: str, volume: tuple[str, str] | None = None) -> dict[str, Any]:
        self.journal.step("create token", role, ",".join(policies))
        self.created.append((metadata, display_name))
        accessor = self._new("pod")
        return {"client_token": f"s.{accessor}", "accessor": accessor, "policies": policies, "lease_duration": 3600}

    def login_jwt_wrapped(self, mount: str, role: str, jwt: str,
                          volume: tuple[str, str] | None = None) -> dict[str, Any]:
        self.journal.step("login", mount, role)
        return self._wrap()

    def revoke_accessor(self, accessor: str) -> bool:
        self.journal.step("revoke", accessor)
        if self.unreachable:
            raise VaultUnavailable("revoking the pod token: cannot reach Vault (test double)")
        found = accessor in self.alive
        self.alive.discard(accessor)
        return found

    def revoke_accessors(self, accessors: list[str]) -> list[bool | DriverError]:
        answers: list[bool | DriverError] = []
        for accessor in accessors:
            try:
                answers.append(self.revoke_accessor(accessor))
            except DriverError as exc:
                answers.append(exc)
        return answers

    def lookup_self(self) -> dict[str, Any]:
        return {"policies": list(self.generator_policies)}

    def read_token_role(self, name: str) -> dict[str, Any] | None:
        return {"token_period": 3600, "token_explicit_max_ttl": 0}
