"""`vaulttmpfs uninstall` on a node whose kubelet execs the installed build (real OpenBao, real tmpfs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from .conftest import driver_env, generator_file
from .kubelet import Kubelet
from .vaultserver import REPO

NGINX = {"vault/policies": "nginx"}


def test_uninstall_refuses_while_mounted_then_removes_everything(bao, driver_cmd, tmp_path, log_dir):
    plugin_dir = tmp_path / "plugins"
    installed = plugin_dir / "cloudwatt~vaulttmpfs" / "vaulttmpfs"
    root = tmp_path / "node"
    root.mkdir()
    token_path = tmp_path / "vaulttoken"
    auth = generator_file(bao, token_path, ttl="1h")
    env = driver_env(bao, {"path": str(token_path)}, root, log_dir, VAULTTMPFS_PLUGIN_DIR=str(plugin_dir))
    install = subprocess.run([*driver_cmd, "install", "--source", str(REPO / "dist" / "vaulttmpfs")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    node = Kubelet([str(installed)], env, root)  # the kubelet runs what was installed
    pod = node.new_pod("web", "shop")
    reply, path = node.mount(pod, NGINX)
    assert reply.ok, reply.body
    # The source runs `python -m vaulttmpfs`; the build runs the installed driver itself, which
    # then deletes the very bundle it runs from.
    uninstall = [*driver_cmd, "uninstall"] if len(driver_cmd) > 1 else [str(installed), "uninstall"]

    refused = subprocess.run(uninstall, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "still mounted, held by: shop/web" in refused.stderr and pod.uid in refused.stderr
    assert node.init().ok and bao.lookup_accessor(auth["accessor"]) is not None and token_path.exists()

    assert node.unmount(path).ok
    # A volume whose tmpfs and pod dir went with a reboot: only its record is left, and its token.
    reply, lost = node.mount(node.new_pod("lost", "shop"), NGINX)
    assert reply.ok, reply.body
    lost_accessor = json.loads((lost / "vault-token.json").read_text())["wrapped_accessor"]
    subprocess.run(["umount", str(lost)], check=True)
    shutil.rmtree(root / "var/lib/kubelet/pods" / lost.parts[-4])
    done = subprocess.run(uninstall, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "generator token revoked" in done.stdout and f"{token_path} removed" in done.stdout
    assert os.listdir(plugin_dir) == []  # no bundle, no staging dir, no lock file
    assert bao.lookup_accessor(auth["accessor"]) is None
    assert bao.lookup_accessor(lost_accessor) is None  # revoked before the generator token went
    assert not token_path.exists()
    assert auth["client_token"] not in done.stdout + done.stderr

    again = subprocess.run([*driver_cmd, "uninstall"] if len(driver_cmd) > 1 else
                           [str(REPO / "dist" / "vaulttmpfs" / "vaulttmpfs"), "uninstall"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "removed nothing" in again.stdout  # idempotent
