"""What a driver call leaves on the node: the volume's files, tmpfs mounts, state records."""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from .conftest import remember_secret


def read_volume(path: Path) -> tuple[str, dict]:
    """(the token file's content, vault-token.json); the token is remembered for the leak check."""
    token = remember_secret((path / "vault-token").read_text())
    return token, json.loads((path / "vault-token.json").read_text())


def read_wrap(path: Path) -> dict:
    """A wrapped volume's wrap_info, whose token is the one in the token file."""
    token, wrap = read_volume(path)
    assert wrap["token"] == token
    return wrap


def mounts_under(root: Path) -> list[str]:
    prefix = os.path.realpath(root) + "/"
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(prefix)]


def state_records(kubelet) -> list[Path]:
    state = kubelet.root / "state"
    return sorted(state.glob("volumes/*.json")) + sorted(state.glob("pending/*.json"))


def assert_refused(reply, kubelet, bao, before: int, expected: str = "") -> None:
    """A Failure that left nothing behind: no tmpfs, no record, no token minted."""
    assert reply.status == "Failure" and reply.exit_code == 1, reply.body
    assert set(reply.body) == {"status", "message"}, reply.body
    assert expected in reply.message, reply.message
    assert mounts_under(kubelet.root) == []
    assert state_records(kubelet) == []
    assert len(bao.accessors()) == before, "a token was minted for a refused mount"


def write_bindings(path: Path, document, mode: int = 0o644, uid: int = 0) -> str:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    os.chown(path, uid, 0)
    path.chmod(mode)
    settled = time.time() - 5  # written whole: no mount need wait for it to stand still (bindings.SETTLE_SECONDS)
    os.utime(path, (settled, settled))
    return str(path)


def teardown_ok(kubelet, path: Path) -> None:
    token = path / "vault-token"
    if token.exists():
        remember_secret(token.read_text())
    assert kubelet.teardown(path).ok


@contextmanager
def small_state_fs(kubelet_root: Path, size: str = "256k"):
    """The node's state dir (<kubelet_root>/state) on a small tmpfs of its own (the tests fill it)."""
    state = kubelet_root / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "vaulttmpfs-test-state", str(state)],
                   check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(directory: Path) -> Path:
    """Every byte left on `directory`'s filesystem taken (ENOSPC for the next write); the filler's path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler
