"""The agent's /metrics after a scripted set of kubelet calls: driver on its own (spooled), relayed
through the agent, a relay fallback, refusals, and a Vault outage (real OpenBao, real tmpfs)."""

from __future__ import annotations

import os
import socket

from .agents import AgentProcess, scrape, value
from .conftest import driver_env, generator_file, source_cmd
from .csinode import CsiNode
from .kubelet import Kubelet
from .vaultserver import closed_addr, free_port

NGINX = {"vault/policies": "nginx"}


def ops(samples: dict, verb: str, via: str, outcome: str, reason: str) -> float:
    return value(samples, "vaulttmpfs_volume_operations_total", verb=verb, front_end="flexvolume", via=via,
                 outcome=outcome, reason=reason)


def test_metrics_count_every_call_with_and_without_the_agent(bao, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    token_path = tmp_path / "vaulttoken"
    generator_file(bao, token_path, ttl="1h")
    env = driver_env(bao, {"path": str(token_path)}, root, log_dir)
    standalone = {**env, "VAULTTMPFS_AGENT_SOCKET": str(root / "no-agent.sock")}
    node = Kubelet(driver_cmd, standalone, root)
    metrics_port = free_port()
    with AgentProcess(driver_cmd, env, "--relay", "--retry-interval", "1h",
                      "--metrics-addr", f"127.0.0.1:{metrics_port}") as agent:
        agent.wait_for(lambda s, b: s == 200 and "relay" in b["services"], "a healthy relaying agent")
        # The driver on its own: spooled, folded in by the agent.
        first, first_path = node.mount(node.new_pod("one"), NGINX)
        second, second_path = node.mount(node.new_pod("two"), NGINX)
        assert first.ok and second.ok, (first.body, second.body)
        assert not node.mount(node.new_pod("greedy"), {"vault/policies": "root-ish"})[0].ok  # the role refuses
        assert not node.call("mount", str(node.volume_dir(node.new_pod("bad"))), "{not json").ok
        outage = {**standalone, "VAULT_ADDR": closed_addr()}
        assert not node.mount(node.new_pod("down"), NGINX, env=outage)[0].ok
        assert node.unmount(first_path, env=outage).ok  # revocation queued: pod token + wrapping token
        assert node.unmount(second_path).ok
        # Relayed through the agent.
        relayed = Kubelet(driver_cmd, env, root)
        reply, relayed_path = relayed.mount(relayed.new_pod("fast"), NGINX)
        assert reply.ok, reply.body
        assert relayed.unmount(relayed_path).ok
        # A stale socket where the agent should be: the driver falls back and does it itself.
        stale_path = str(root / "stale.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(stale_path)
        stale.close()
        fallback = Kubelet(driver_cmd, {**env, "VAULTTMPFS_AGENT_SOCKET": stale_path}, root)
        reply, fallback_path = fallback.mount(fallback.new_pod("slow"), NGINX)
        assert reply.ok, reply.body
        assert node.unmount(fallback_path).ok

        samples = scrape(metrics_port)
        assert ops(samples, "mount", "driver", "success", "ok") == 3
        assert ops(samples, "mount", "driver", "failure", "denied") == 1
        assert ops(samples, "mount", "driver", "failure", "bad_request") == 1
        assert ops(samples, "mount", "driver", "failure", "vault_unavailable") == 1
        assert ops(samples, "unmount", "driver", "success", "ok") == 3
        assert ops(samples, "mount", "relay", "success", "ok") == 1
        assert ops(samples, "unmount", "relay", "success", "ok") == 1
        duration = "vaulttmpfs_volume_operation_duration_seconds_count"
        assert value(samples, duration, verb="mount", front_end="flexvolume", via="driver") == 6
        assert value(samples, duration, verb="mount", front_end="flexvolume", via="relay") == 1
        assert value(samples, duration, verb="unmount", front_end="flexvolume", via="driver") == 3
        vault = "vaulttmpfs_vault_request_duration_seconds_count"
        assert value(samples, vault, call="create", outcome="ok") == 4  # 3 by drivers, 1 in the agent
        assert value(samples, vault, call="create", outcome="error") == 2  # refused + outage
        assert value(samples, vault, call="revoke", outcome="error") == 2  # both accessors, in the outage
        assert value(samples, vault, call="revoke", outcome="ok") == 6
        assert value(samples, "vaulttmpfs_relay_fallbacks_total") == 1
        assert value(samples, "vaulttmpfs_relay_connections_total", result="relayed") == 2
        assert value(samples, "vaulttmpfs_pending_revocations") == 2
        assert value(samples, "vaulttmpfs_volumes") == 0
        assert value(samples, "vaulttmpfs_spooled_records_total") == 9
        assert value(samples, "vaulttmpfs_generator_renewal_ok") == 1
        assert value(samples, "vaulttmpfs_generator_renewals_total", result="success") >= 1
        assert 0 < value(samples, "vaulttmpfs_generator_token_ttl_seconds") <= 3600
        # Folded once: a second scrape counts nothing twice, and the spool is empty.
        assert scrape(metrics_port)[("vaulttmpfs_spooled_records_total", ())] == 9
        assert os.path.getsize(os.path.join(env["VAULTTMPFS_STATE_DIR"], "metrics", "calls.jsonl")) == 0
        assert agent.terminate() == 0
    retry = node.call_cli("retry-revocations")
    assert retry.returncode == 0, retry.stdout + retry.stderr


def test_spool_is_root_only_and_bounded_without_an_agent(bao, generator, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    node = Kubelet(driver_cmd, driver_env(bao, generator, root, log_dir), root)
    spool = root / "state" / "metrics" / "calls.jsonl"
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok and node.unmount(path).ok
    assert (spool.stat().st_mode & 0o777, spool.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    lines = spool.read_text().splitlines()
    assert len(lines) == 2 and '"verb":"mount"' in lines[0] and '"outcome":"success"' in lines[1]
    assert generator["token"] not in spool.read_text()
    with open(spool, "ab") as handle:  # a node whose agent never folds: the spool stops growing
        handle.write(b"x" * (1 << 20))
    size = spool.stat().st_size
    assert node.call("mount", str(path), "{not json").exit_code == 1
    assert spool.stat().st_size == size


def test_csi_calls_are_counted_as_the_csi_front_end(bao, generator, tmp_path, log_dir):
    import grpc
    import pytest

    from .csikubelet import new_pod

    port = free_port()
    (tmp_path / "csi").mkdir()
    node = CsiNode(source_cmd(), bao, generator, tmp_path / "csi", log_dir,
                   VAULTTMPFS_METRICS_ADDR=f"127.0.0.1:{port}")
    node.start()
    try:
        pod = new_pod(namespace="shop")
        node.kubelet.publish(pod, NGINX)
        with pytest.raises(grpc.RpcError):  # not bound to namespace "payments": refused before Vault
            node.kubelet.publish(new_pod(namespace="payments"), NGINX)
        node.kubelet.unpublish(pod)
        samples = scrape(port)
        csi = {"front_end": "csi", "via": "agent"}
        count = "vaulttmpfs_volume_operations_total"
        assert value(samples, count, verb="mount", outcome="success", reason="ok", **csi) == 1
        assert value(samples, count, verb="mount", outcome="failure", reason="refused", **csi) == 1
        assert value(samples, count, verb="unmount", outcome="success", reason="ok", **csi) == 1
        assert value(samples, "vaulttmpfs_volume_operation_duration_seconds_count", verb="mount", **csi) == 2
        assert value(samples, "vaulttmpfs_vault_request_duration_seconds_count", call="create", outcome="ok") == 1
    finally:
        node.stop()
