"""A real 3-node OpenBao cluster with Raft storage on loopback: one address per node (127.0.0.1, an
API and a cluster port each).

Each node is `bao server -config=...` with its own Raft data dir under the run's temp dir (real
files, fsync'd by bbolt), initialised and unsealed through the API (one Shamir share), the others
joined to the first with sys/storage/raft/join. Nodes get PR_SET_PDEATHSIG like the dev server
(vaultserver.py): they die with the run even on kill -9. Stdlib only, like vaultserver.py.

What a client sees (OpenBao 2.7): a standby forwards writes to the active node over the cluster
port and serves reads itself (`disable_standby_reads` is false by default: reads are eventually
consistent), and redirects (307) when asked not to forward. So one node's address works until that
node goes; surviving a dead node takes an address that is not one node's (a load balancer).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
from pathlib import Path

from .vaultserver import PortTaken, VaultServer, bao_binary, free_port, stop_process

# VAULTTMPFS_RAFT_AUDIT=1 (the bench's --cluster-audit): a file audit device on every node, writing to the
# node's stdout, i.e. its own bao.log (a declared device is replicated: one file_path for all nodes, so
# stdout is what keeps them apart). Values stay HMAC'd: only paths, operations and headers are counted.
AUDIT_STANZA = """
audit "file" "bench" {
  options {
    file_path = "stdout"
  }
}
"""


class RaftNode(VaultServer):
    """One Raft node; the admin helpers of VaultServer (request, write_policy, ...) against it."""

    def __init__(self, name: str, workdir: str, binary: str | None = None):
        # Not VaultServer.__init__: that makes a dev server's temp dir and root token.
        self.binary = binary or bao_binary()
        self.name = name
        self.workdir = os.path.join(workdir, name)  # in the cluster's dir, removed with it
        os.makedirs(os.path.join(self.workdir, "raft"), mode=0o700)
        self.log_path = os.path.join(self.workdir, "bao.log")
        self.port, self.cluster_port = free_port(), free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = ""  # known once the cluster is initialised
        self.proc: subprocess.Popen | None = None
        self.cluster: RaftCluster | None = None  # set by RaftCluster: a node handed out alone knows its peers

    def _config(self) -> str:
        # Raft's tightest timings (elections in ~2 s), as for a LAN; autopilot promotes joined nodes
        # to voters within ~2 s, not 10 (else a leader killed early leaves no quorum)
        return f"""
storage "raft" {{
  path = "{self.workdir}/raft"
  node_id = "{self.name}"
  performance_multiplier = 1
  autopilot_reconcile_interval = "1s"
  autopilot_update_interval = "500ms"
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_disable = true
}}
api_addr = "{self.addr}"
cluster_addr = "https://127.0.0.1:{self.cluster_port}"
disable_mlock = true
log_level = "info"
# sys/metrics in Prometheus form (the bench's request count: vault_core_handle_request_count, per node)
telemetry {{
  prometheus_retention_time = "1h"
  disable_hostname = true
}}
""" + (AUDIT_STANZA if os.environ.get("VAULTTMPFS_RAFT_AUDIT") else "")

    def start(self, timeout: float = 30.0) -> "RaftNode":
        for _ in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                self.port, self.cluster_port = free_port(), free_port()
                self.addr = f"http://127.0.0.1:{self.port}"
        return self._start(timeout)

    def _start(self, timeout: float) -> "RaftNode":
        config = os.path.join(self.workdir, "config.hcl")
        Path(config).write_text(self._config())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        self._spawn([self.binary, "server", f"-config={config}"], {**env, "HOME": self.workdir}, log_mode="ab")
        self._wait_until(lambda health: True, timeout, f"bao node {self.name}")  # listening: sealed is an answer
        return self

    def health(self) -> dict | None:
        try:
            return self.request("GET", "sys/health", token=None)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no step-down, no goodbye to the others."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)  # the files stay: the cluster removes its dir


class RaftCluster:
    """Three (or `size`) nodes; `leader()` and `standbys()` ask the nodes, every time."""

    def __init__(self, size: int = 3, binary: str | None = None):
        self.workdir = tempfile.mkdtemp(prefix="vaulttmpfs-raft-")
        self.nodes = [RaftNode(f"node{n}", self.workdir, binary) for n in range(1, size + 1)]
        for node in self.nodes:
            node.cluster = self  # a node handed out alone (the bench's standby) still knows its peers
        self.unseal_key = ""
        self.root_token = ""

    def start(self, timeout: float = 60.0) -> "RaftCluster":
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start()
            first = self.nodes[0]
            init = first.request("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}, token=None)
            self.unseal_key, self.root_token = init["keys_base64"][0], init["root_token"]
            for node in self.nodes:
                node.root_token = self.root_token
            first.request("PUT", "sys/unseal", {"key": self.unseal_key}, token=None)
            self._wait(lambda: first.health() or {}, lambda h: h.get("initialized") and not h.get("sealed")
                       and not h.get("standby"), deadline, "node1 to become active")
            # Autopilot makes a joined node a voter once it has been healthy this long (default 10 s).
            first.request("POST", "sys/storage/raft/autopilot/configuration", {"server_stabilization_time": "1s"})
            for node in self.nodes[1:]:
                node.request("PUT", "sys/storage/raft/join", {"leader_api_addr": first.addr}, token=None)
                node.request("PUT", "sys/unseal", {"key": self.unseal_key}, token=None)
            self._wait(self.voters, lambda voters: len(voters) == len(self.nodes), deadline,
                       f"{len(self.nodes)} Raft voters")
            self.wait_for_leader(max(deadline - time.monotonic(), 1.0))
        except BaseException:
            self.stop()
            raise
        return self

    def heal(self, timeout: float = 30.0) -> None:
        """Restart every dead node on its own data dir and ports and unseal it: it rejoins the cluster
        it was in (nothing is joined anew). Returns once every node follows the active one."""
        for node in self.nodes:
            if not node.alive():
                node._start(timeout)
                node.request("PUT", "sys/unseal", {"key": self.unseal_key}, token=None)
        self.wait_for_leader(timeout)

    def voters(self) -> list[str]:
        """The Raft configuration's voters, as the leader sees it ([] when it cannot say)."""
        try:
            servers = self.leader().request("GET", "sys/storage/raft/configuration")["data"]["config"]["servers"]
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return []
        return [s["node_id"] for s in servers if s.get("voter")]

    def leader(self) -> RaftNode:
        """The one active node; RuntimeError when none is (an election is on)."""
        for node in self.nodes:
            if node.alive() and (health := node.health()) and health.get("initialized") \
                    and not health.get("sealed") and not health.get("standby"):
                return node
        raise RuntimeError("no active node")

    def wait_for_leader(self, timeout: float = 30.0, not_: RaftNode | None = None) -> RaftNode:
        """The active node once every live node names it (sys/leader). A standby that reports
        itself one (sys/health) may not know the active node yet: it answers 500 "local node not
        active but active cluster node not found" until it does."""
        def agreed():
            try:
                leader = self.leader()
            except RuntimeError:
                return None
            followers = [n for n in self.nodes if n.alive() and n is not leader]
            if all(self._leader_address(n) == leader.addr for n in followers):
                return leader
            return None
        return self._wait(agreed, lambda node: node is not None and node is not not_,
                          time.monotonic() + timeout, "every node to follow one active node")

    @staticmethod
    def _leader_address(node: RaftNode) -> str | None:
        try:
            return node.request("GET", "sys/leader", token=None).get("leader_address")
        except Exception:  # noqa: BLE001 - sealed, starting: no answer yet
            return None

    def standbys(self) -> list[RaftNode]:
        leader = self.leader()
        return [n for n in self.nodes if n is not leader and n.alive()]

    @staticmethod
    def _wait(probe, done, deadline: float, what: str):
        while True:
            value = probe()
            if done(value):
                return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what} (last: {value!r})")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RaftCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
