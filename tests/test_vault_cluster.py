"""The driver against a real 3-node OpenBao Raft cluster (tests/raftcluster.py), exec'd as the kubelet does.

VAULT_ADDR is one address: here a standby's. A standby forwards the driver's writes (the token
create, the revocation) to the active node, so the leader can move, or die, between calls. The
address itself must stay up: in production that is a load balancer (or a name) in front of the
nodes, not one node's address.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import driver_env, token_file, unmount_everything_under
from .kubelet import Kubelet, is_mount_point

NGINX = {"vault/policies": "nginx"}


@pytest.fixture
def node(cluster, driver_cmd, tmp_path, log_dir):
    """A node whose driver talks to one standby's address."""
    auth = cluster.leader().generator_token(ttl="1h")
    (tmp_path / "generator").mkdir()
    generator = {"path": token_file(tmp_path / "generator", auth["client_token"])}
    root = tmp_path / "node"
    root.mkdir()
    kubelet = Kubelet(driver_cmd, driver_env(cluster.standbys()[0], generator, root, log_dir), root)
    yield kubelet
    unmount_everything_under(root)


def pod_accessor(path: Path) -> str:
    return json.loads((path / "vault-token.json").read_text())["wrapped_accessor"]


def test_a_standby_address_mounts_and_unmounts(cluster, node):
    assert node.env["VAULT_ADDR"] in {n.addr for n in cluster.standbys()}
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    accessor = pod_accessor(path)
    assert "nginx" in cluster.leader().lookup_accessor(accessor)["policies"]
    assert node.teardown(path).ok
    assert accessor not in cluster.leader().accessors()


def test_the_leader_killed_between_calls(cluster, node):
    reply, first = node.mount(node.new_pod("before"), NGINX)
    assert reply.ok, reply.body
    first_accessor = pod_accessor(first)
    old = cluster.leader()
    old.kill()
    # At once: the standby cannot forward to the dead leader and redirects (307) to its address,
    # refused: a Failure at once, nothing mounted, and the kubelet retries. (Or the election won.)
    at_once, during = node.mount(node.new_pod("during"), NGINX)
    assert at_once.seconds < 10, at_once.body
    assert at_once.ok or not is_mount_point(during), at_once.body
    started = time.monotonic()
    new = cluster.wait_for_leader(not_=old)
    elected = time.monotonic() - started

    reply = node.teardown(first)  # the revocation goes to the new leader
    assert reply.ok, (reply.body, f"leader re-elected in {elected:.1f}s")
    assert first_accessor not in new.accessors()
    reply, second = node.mount(node.new_pod("after"), NGINX)
    assert reply.ok, reply.body
    second_accessor = pod_accessor(second)
    assert second_accessor in new.accessors()
    assert node.teardown(second).ok
    assert not is_mount_point(second) and second_accessor not in new.accessors()
    if at_once.ok:
        assert node.teardown(during).ok


def audited(cluster, marks: dict) -> dict:
    """Per node name: the (operation, path, sorted audited-header names) of each request entry since `marks`."""
    seen = {}
    for server in cluster.nodes:
        with open(server.log_path, "rb") as log:
            log.seek(marks[server.name])
            entries = [json.loads(line) for line in log.read().splitlines() if line.startswith(b"{")]
        seen[server.name] = sorted(
            (e["request"]["operation"], e["request"]["path"], tuple(sorted(e["request"].get("headers") or {})))
            for e in entries if e.get("type") == "request" and not e["request"]["path"].startswith("sys/"))
    return seen


def test_a_pod_costs_the_cluster_one_create_and_two_revocations_and_nothing_else(driver_cmd, tmp_path, log_dir,
                                                                                monkeypatch):
    """Issue 20: what a pod's publish+unpublish sends each node, from their audit logs. The standby asked
    answers nothing itself (no lookup, no role read once the first mount has done them) and forwards the
    create and both revocations; none carries X-Vault-Index/forward-active-node (that is only for a
    'gone' answer, revoke_accessor), so no call waits for an index."""
    from .raftcluster import RaftCluster

    monkeypatch.setenv("VAULTTMPFS_RAFT_AUDIT", "1")
    with RaftCluster() as audited_cluster:
        leader = audited_cluster.leader()
        leader.setup_driver()
        for header in ("x-vault-index", "x-vault-inconsistent", "x-vault-forward"):
            leader.request("POST", f"sys/config/auditing/request-headers/{header}", {"hmac": False})
        auth = leader.generator_token(ttl="1h")
        (tmp_path / "generator").mkdir()
        generator = {"path": token_file(tmp_path / "generator", auth["client_token"])}
        root = tmp_path / "node"
        root.mkdir()
        standby = audited_cluster.standbys()[0]
        kubelet = Kubelet(driver_cmd, driver_env(standby, generator, root, log_dir), root)
        try:
            reply, path = kubelet.mount(kubelet.new_pod(), NGINX)  # the first: the generator check, the role read
            assert reply.ok, reply.body
            assert kubelet.teardown(path).ok
            time.sleep(1)  # the audit entries of the last revocation written
            marks = {n.name: Path(n.log_path).stat().st_size for n in audited_cluster.nodes}
            reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
            assert reply.ok, reply.body
            accessor = pod_accessor(path)
            assert kubelet.teardown(path).ok
            time.sleep(1)
        finally:
            unmount_everything_under(root)
        seen = audited(audited_cluster, marks)
        assert accessor not in leader.accessors()  # after the count: this listing is audited too
        cycle = [("update", "auth/token/create/applications", ()),
                 ("update", "auth/token/revoke-accessor", ()), ("update", "auth/token/revoke-accessor", ())]
        assert seen[standby.name] == sorted(cycle)  # each tried there as a read, then forwarded
        assert seen[leader.name] == sorted(cycle)
        assert [v for name, v in seen.items() if name not in (standby.name, leader.name)] == [[]]
