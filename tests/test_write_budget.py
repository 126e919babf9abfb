"""The node's budget of Vault writes in flight (VAULTTMPFS_VAULT_WRITE_BUDGET, vault/write_budget.py).

A node comes back from a reboot: its tmpfs volumes are gone, their records (and old tokens) are not, and
the kubelet publishes every volume again at once. Each republish revokes the old pair and creates a new
one: 3 writes per volume. With a budget of 2, the loopback server in front of the real OpenBao (a Vault
slowed to 50 ms a write) never sees more than 2 writes at once from the agent, every call still succeeds
within its deadline, and no old token survives.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from .agents import scrape, value
from .conftest import source_cmd, unmount_everything_under
from .csikubelet import new_pod
from .csinode import CsiNode
from .faultserver import FaultServer
from .vaultserver import free_port

NGINX = {"vault/policies": "nginx"}
VOLUMES = 100


def test_a_rebooted_node_never_has_more_than_its_budget_of_writes_in_flight(bao, generator, tmp_path, log_dir):
    port = free_port()
    with FaultServer(bao.addr) as vault:
        node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir, VAULTTMPFS_VAULT_WRITE_BUDGET="2",
                       VAULTTMPFS_METRICS_ADDR=f"127.0.0.1:{port}", VAULT_ADDR=vault.addr).start()
        pods = [new_pod(f"reboot-{n}") for n in range(VOLUMES)]
        try:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda pod: node.kubelet.publish(pod, NGINX), pods))
            old = set(bao.accessors())
            # The reboot: the agent dies, the tmpfs mounts go; the state dir (records, old tokens) stays.
            node.kill()
            unmount_everything_under(node.root)
            node.start()
            vault.add("/v1/", "slow", seconds=0.05)
            vault.writes_peak = 0
            started = time.monotonic()
            with ThreadPoolExecutor(16) as pool:  # the kubelet republishes every pod's volume at once
                paths = list(pool.map(lambda pod: node.kubelet.publish(pod, NGINX), pods))
            took = time.monotonic() - started
            assert all(os.path.ismount(p) for p in paths)
            assert vault.writes_peak == 2, vault.writes_peak  # the budget, reached and never passed
            samples = scrape(port)
            assert value(samples, "vaulttmpfs_vault_writes_in_flight_peak") == 2
            assert value(samples, "vaulttmpfs_vault_write_budget_waits_total") > 0
            assert value(samples, "vaulttmpfs_vault_write_budget_refusals_total") == 0
            # 3 writes per volume at 50 ms, 2 at a time: the floor is 7.5 s.
            assert took >= VOLUMES * 3 * 0.05 / 2, took
            mine = old - set(bao.accessors())
            assert len(mine) >= 2 * VOLUMES  # every old pair revoked
            vault.clear()
            for pod in pods:
                node.kubelet.teardown(pod)
            assert not (set(bao.accessors()) - old)  # the new pairs too
        finally:
            node.stop()
