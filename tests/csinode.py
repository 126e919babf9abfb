"""One CSI node for the tests: a kubelet root under a temp dir, `vaulttmpfs agent --csi-endpoint` on a
short socket path, and the kubelet's gRPC calls (tests/csikubelet.py)."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from pathlib import Path

from .agents import AgentProcess
from .conftest import driver_env, unmount_everything_under
from .csikubelet import CsiKubelet

NODE_NAME = "csi-node-1"
# Namespaces "shop" and "default" may have nginx; every namespace may have "other" and "app-*" (which the token role
# does not allow: Vault itself refuses those).
BINDINGS = {"bindings": [{"name": "shop", "namespaces": ["shop", "default"], "policies": ["nginx"]},
                         {"name": "all", "namespaces": ["*"], "policies": ["other", "app-*"]}]}


class CsiNode:
    """One node: a kubelet root under a temp dir, an agent serving CSI on a short socket path."""

    def __init__(self, cmd: list[str], bao, generator: dict, root: Path, log_dir: Path, **env: str):
        self.root = root
        self.sock_dir = Path(tempfile.mkdtemp(prefix="vtcsi", dir="/tmp"))  # unix paths max 108 bytes
        self.socket = self.sock_dir / "csi.sock"
        bindings = root / "bindings.json"
        bindings.write_text(json.dumps(BINDINGS))
        bindings.chmod(0o644)
        self.env = driver_env(bao, generator, root, log_dir, VAULTTMPFS_NODE_NAME=NODE_NAME,
                              VAULTTMPFS_POLICY_BINDINGS=str(bindings),
                              VAULTTMPFS_CSI_ENDPOINT=f"unix://{self.socket}", **env)
        self.cmd = cmd
        self.agent: AgentProcess | None = None
        self.kubelet = CsiKubelet(str(self.socket), root / "var/lib/kubelet/pods", NODE_NAME)
        self.log_file = Path(self.env["VAULTTMPFS_LOG_FILE"])

    def start(self) -> "CsiNode":
        self.agent = AgentProcess(self.cmd, self.env, "--retry-interval", "1h")
        self.agent.wait_for(lambda status, body: body["services"].get("csi", {}).get("serving"), "CSI serving")
        self.kubelet.wait_ready()
        return self

    def kill(self) -> None:
        self.agent.proc.send_signal(signal.SIGKILL)
        self.agent.proc.wait()

    def stop(self) -> None:
        if self.agent and self.agent.proc.poll() is None:
            assert self.agent.terminate() == 0
        self.kubelet.close()
        unmount_everything_under(self.root)
        shutil.rmtree(self.sock_dir, ignore_errors=True)
