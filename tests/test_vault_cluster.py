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
