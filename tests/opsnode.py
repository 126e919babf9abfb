"""A node as its operator sees it, for the `bootstrap` tests: a shell with the driver's environment
and a fresh generator token path; a few Vault look-ups the tests make."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import remember_secret
from .ldapserver import User
from .vaultserver import REPO, VaultServer

NODE = "node-a"


@dataclass
class Node:
    """One node's operator shell: the driver's environment plus a fresh token path."""

    cmd: list[str]
    env: dict[str, str]
    token_path: Path
    log_file: Path
    outputs: list[str] = field(default_factory=list)

    def run(self, *args: str, input: str | None = None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.cmd, *args], input=input if input is not None else "", capture_output=True,
                              text=True, env={**self.env, **env}, timeout=timeout)
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def bootstrap_ldap(self, user: User, *args: str, password: str | None = None, **env: str):
        return self.run("bootstrap", "--username", user.uid, *args,
                        input=(user.password if password is None else password) + "\n", **env)

    def token(self) -> str:
        return remember_secret(self.token_path.read_text().strip())

    def assert_never_shown(self, *values: str) -> None:
        """No secret in anything the commands printed, nor in their log."""
        logged = self.log_file.read_text() if self.log_file.exists() else ""
        for value in values:
            assert value and all(value not in text for text in self.outputs), "a secret was printed"
            assert value not in logged, f"a secret reached {self.log_file}"


def make_node(server: VaultServer, driver_cmd: list[str], tmp_path: Path, log_dir: Path) -> Node:
    token_path = tmp_path / "etc" / "kubernetes" / "vaulttoken"  # its parent does not exist yet
    log_file = log_dir / f"bootstrap-{tmp_path.name}.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": str(REPO),
        "HOME": str(tmp_path),
        "VAULT_ADDR": server.addr,
        "VAULTTMPFS_GENERATOR_TOKEN_PATH": str(token_path),
        "VAULTTMPFS_LOG_FILE": str(log_file),
        "VAULTTMPFS_NODE_NAME": NODE,
        "VAULT_MAX_RETRIES": "1",
        "VAULT_CLIENT_TIMEOUT": "5s",
    }
    return Node(driver_cmd, env, token_path, log_file)


def lookup(server: VaultServer, token: str) -> dict:
    return server.request("POST", "auth/token/lookup", {"token": token})["data"]


def admin_token(server: VaultServer) -> str:
    """What a person gets from `bao token create -policy=vaulttmpfs-admin` to bootstrap without LDAP."""
    return remember_secret(server.create_token(policies=["vaulttmpfs-admin"], ttl="10m",
                                               display_name="ops")["client_token"])
