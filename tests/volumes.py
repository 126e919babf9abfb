"""What a driver call leaves on the node: the volume's files, tmpfs mounts, state records."""

from __future__ import annotations

import json
import os
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
    return str(path)


def teardown_ok(kubelet, path: Path) -> None:
    token = path / "vault-token"
    if token.exists():
        remember_secret(token.read_text())
    assert kubelet.teardown(path).ok
