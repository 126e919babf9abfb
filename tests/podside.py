"""The pod side's test helpers (the `token` command in a container), shared by test_pod_token and
test_redirects."""

from __future__ import annotations

import os
from pathlib import Path

from .conftest import remember_secret
from .vaultserver import REPO

FS_GROUP = 2000


def out_dir(tmp_path: Path, name: str = "out", group: int | None = FS_GROUP) -> Path:
    """The shared emptyDir as the kubelet makes it under an fsGroup: group-owned, setgid."""
    path = tmp_path / name
    path.mkdir()
    if group is not None:
        os.chown(path, 0, group)
        path.chmod(0o2770)
    return path


def token_argv(driver_cmd: list[str], volume: Path, out: Path, *flags: str) -> list[str]:
    return [*driver_cmd, "token", "--volume", str(volume), "--out", str(out), *flags]


def pod_env(vault_addr: str) -> dict[str, str]:
    # A container's environment: VAULT_ADDR and nothing of the node's settings.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "VAULT_ADDR": vault_addr}


def wrapping_token(volume: Path) -> str:
    return remember_secret((volume / "vault-token").read_text())
