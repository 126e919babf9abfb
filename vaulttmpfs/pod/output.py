"""The files consumers read, in the pod's shared memory emptyDir. Files only.

- `token`: the bare token (Vault/OpenBao Agent `token_file` auto-auth, consul-template, VAULT_TOKEN);
- `kubernetes-vault.json`: kubernetes-vault's format, read by vault-sidekick (AUTH_FORMAT=kubernetes-vault).
  It is also our record: its accessor tells a restarted container the token is already here.
- `ca.crt`: Vault's CA, copied from the volume when it has one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Iterator

from ..engine import files

TOKEN_FILE = "token"
RECORD_FILE = "kubernetes-vault.json"
CA_FILE = "ca.crt"
UNANSWERED_FILE = ".unwrap-unanswered"  # no secret in it: which wrapping token got no answer, and when
MAX_RECORD_BYTES = 64 * 1024
# engine.files' temp names for ours: .<name>.<pid>.<thread>.tmp
_OWN_TEMP = re.compile(r"\.(?:%s)\.\d+\.\d+\.tmp" % "|".join(
    re.escape(name) for name in (TOKEN_FILE, RECORD_FILE, CA_FILE, UNANSWERED_FILE)))


@dataclass(frozen=True)
class Held:
    """The pod's token, as written out."""

    token: str
    accessor: str
    lease_duration: int
    renewable: bool


@contextlib.contextmanager
def locked(out_dir: str) -> Iterator[None]:
    """One writer at a time: two containers started together must not both try the single-use unwrap
    (the loser would report an interception that is not one)."""
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)  # the dir itself: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def drop_stale_temps(out_dir: str) -> None:
    """Temp files of ours that a writer killed mid-write (kill -9) left: the token's holds the token.
    Called under the lock, which every writer of these files holds, so whoever left one is gone (its pid
    would not say: the pod's containers need not share a pid namespace)."""
    for name in os.listdir(out_dir):
        if _OWN_TEMP.fullmatch(name):
            with contextlib.suppress(OSError):  # e.g. a dir under that name: not ours to take
                os.unlink(os.path.join(out_dir, name))


def read_record(out_dir: str) -> dict | None:
    """The kubernetes-vault JSON already there (a restart), or None."""
    try:
        record = json.loads(_read(out_dir, RECORD_FILE, MAX_RECORD_BYTES))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and all(isinstance(record.get(k), str) and record[k]
                                          for k in ("clientToken", "accessor"))
    return record if ok else None


def note_unanswered(out_dir: str, accessor: str, when: float) -> None:
    """An unwrap is about to go out (or went out at `when` and its token was never written): Vault may
    act on it. Kept so the next run can say so; dropped once the token is written."""
    data = json.dumps({"accessor": accessor, "at": when}).encode()
    files.replace(os.path.join(out_dir, UNANSWERED_FILE), data, 0o400, gid=None, durable=False)


def forget_unanswered(out_dir: str) -> None:
    files.remove(os.path.join(out_dir, UNANSWERED_FILE))


def unanswered(out_dir: str, accessor: str) -> float | None:
    """When an earlier run's unwrap of this volume's token got no answer, if one did."""
    try:
        note = json.loads(_read(out_dir, UNANSWERED_FILE, 4096))
    except (OSError, ValueError):
        return None
    ok = isinstance(note, dict) and note.get("accessor") == accessor and isinstance(note.get("at"), (int, float))
    return note["at"] if ok else None


def file_mode(out_dir: str) -> int:
    """0440 in a setgid dir (the kubelet's emptyDir under an fsGroup: files get that group), else 0400."""
    return 0o440 if os.stat(out_dir).st_mode & stat.S_ISGID else 0o400


def write(out_dir: str, held: Held, vault_addr: str, ca: bytes | None) -> None:
    """Each file replaced atomically; the record first, so a crash part-way leaves it to heal from."""
    mode = file_mode(out_dir)
    record = {
        "clientToken": held.token,
        "accessor": held.accessor,
        "leaseDuration": held.lease_duration,
        "renewable": held.renewable,
        "vaultAddr": vault_addr,
    }
    if ca is not None:
        _replace(out_dir, CA_FILE, ca, mode | 0o044)  # public
    _replace(out_dir, RECORD_FILE, json.dumps(record, indent=2).encode() + b"\n", mode)
    _replace(out_dir, TOKEN_FILE, held.token.encode(), mode)
    forget_unanswered(out_dir)


def _replace(out_dir: str, name: str, data: bytes, mode: int) -> None:
    # gid None: no chown (we are the pod's user); a setgid dir gives the file its group.
    files.replace(os.path.join(out_dir, name), data, mode, gid=None, durable=False)


def _read(out_dir: str, name: str, limit: int) -> bytes:
    """The dir is shared with the pod's other containers: a FIFO planted under one of our names must not
    hang the run, nor a symlink make it read another file. Either counts as no file (then replaced)."""
    return files.read_small_file(os.path.join(out_dir, name), limit, follow=False)
