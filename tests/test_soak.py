"""Soak: 200 pod volumes (VAULTTMPFS_SOAK_CYCLES; 500 or more for a longer soak) mounted and torn
down, 10 at a time, exec'd the kubelet's way against the session's real OpenBao. Afterwards Vault
holds exactly the tokens it held before, and nothing is left mounted or recorded. Source driver
only, to bound the suite's time (the build runs the same code; test_driver runs both)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

from .conftest import driver_env, remember_secret, source_cmd
from .kubelet import Kubelet
from .volumes import mounts_under

# 200 keeps `make test` within ~10 min on 2 cores: every cycle's leak still shows; rarer races want more.
CYCLES = int(os.environ.get("VAULTTMPFS_SOAK_CYCLES", "200"))
CONCURRENCY = 10
NGINX = {"vault/policies": "nginx"}


def test_soak_mount_unmount_cycles_leave_nothing_behind(bao, generator, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    kubelet = Kubelet(source_cmd(), driver_env(bao, generator, root, log_dir), root)
    before = set(bao.accessors())

    def cycle(i: int) -> str | None:
        reply, path = kubelet.mount(kubelet.new_pod(f"soak-{i}", namespace=f"ns-{i % 7}"), NGINX)
        if not reply.ok:
            return f"mount {i}: {reply.message}"
        wrap = json.loads((path / "vault-token.json").read_text())
        if remember_secret((path / "vault-token").read_text()) != wrap["token"]:
            return f"mount {i}: token file and wrap info disagree"
        reply = kubelet.teardown(path)
        if not reply.ok or "revoked" not in reply.message:
            return f"unmount {i}: {reply.message}"
        return None

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        failures = [f for f in pool.map(cycle, range(CYCLES)) if f]

    assert failures == [], failures[:5]
    assert set(bao.accessors()) == before, "tokens leaked"
    assert mounts_under(root) == []
    state = root / "state"
    assert sorted(p.name for p in (state / "volumes").iterdir()) == []  # no records, no lock files
    assert not (state / "pending").exists() or list((state / "pending").iterdir()) == []
    pods = root / "var/lib/kubelet/pods"
    assert [p for p in pods.glob("*/volumes/*/*")] == []  # the kubelet removed every volume dir
