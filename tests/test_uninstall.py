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


def test_uninstall_revokes_nothing_when_the_driver_is_not_in_its_plugin_dir(bao, driver_cmd, tmp_path, log_dir):
    """Installed into GKE's plugin dir, uninstalled with another (the host's default, a ConfigMap that never
    named the dir): revoking the generator token would leave the driver installed and every mount failing."""
    gke = tmp_path / "home/kubernetes/flexvolume"
    root = tmp_path / "node"
    root.mkdir()
    token_path = tmp_path / "vaulttoken"
    auth = generator_file(bao, token_path, ttl="1h")
    env = driver_env(bao, {"path": str(token_path)}, root, log_dir,
                     VAULTTMPFS_PLUGIN_DIR=str(tmp_path / "usr/libexec/kubernetes/kubelet-plugins/volume/exec"))
    run = lambda *args: subprocess.run([*driver_cmd, *args], env=env, capture_output=True, text=True,  # noqa: E731
                                       timeout=120)
    assert run("install", "--plugin-dir", str(gke), "--source", str(REPO / "dist" / "vaulttmpfs")).returncode == 0

    refused = run("uninstall")
    assert refused.returncode == 1
    assert f"no driver in {env['VAULTTMPFS_PLUGIN_DIR']}/cloudwatt~vaulttmpfs" in refused.stderr, refused.stderr
    assert "nothing was revoked or removed: pass --plugin-dir" in refused.stderr
    assert bao.lookup_accessor(auth["accessor"]) is not None and token_path.exists()
    node = Kubelet([str(gke / "cloudwatt~vaulttmpfs" / "vaulttmpfs")], env, root)
    assert node.init().ok

    done = run("uninstall", "--plugin-dir", str(gke))
    assert done.returncode == 0, done.stderr
    assert bao.lookup_accessor(auth["accessor"]) is None and os.listdir(gke) == []
    assert run("uninstall").returncode == 0  # nothing left to revoke or remove: done, wherever it looks


def test_uninstall_where_the_pods_dir_is_not_visible_says_so_instead_of_naming_a_pod_long_gone(
        bao, driver_cmd, tmp_path, log_dir):
    """A pod gone while the node was down leaves only its record and its token; reconcile revokes it, but
    only where the kubelet's pods dir is visible (else every volume would look gone)."""
    root = tmp_path / "node"
    root.mkdir()
    token_path = tmp_path / "vaulttoken"
    auth = generator_file(bao, token_path, ttl="1h")
    plugin_dir = tmp_path / "plugins"
    env = driver_env(bao, {"path": str(token_path)}, root, log_dir, VAULTTMPFS_PLUGIN_DIR=str(plugin_dir))
    run = lambda *args: subprocess.run([*driver_cmd, *args], env=env, capture_output=True, text=True,  # noqa: E731
                                       timeout=120)
    assert run("install", "--source", str(REPO / "dist" / "vaulttmpfs")).returncode == 0
    node = Kubelet(driver_cmd, env, root)
    reply, gone = node.mount(node.new_pod("gone", "shop"), NGINX)
    assert reply.ok, reply.body
    accessor = json.loads((gone / "vault-token.json").read_text())["wrapped_accessor"]
    subprocess.run(["umount", str(gone)], check=True)
    pods = root / "var/lib/kubelet/pods"
    shutil.rmtree(pods / gone.parts[-4])
    pods.rename(root / "pods-elsewhere")  # as a container without the pods dir mounted sees it

    refused = run("uninstall")
    assert refused.returncode == 1
    assert "held by: shop/gone" in refused.stderr
    assert f"reconcile could not judge them, so some may be gone already: the kubelet's pods dir {pods} " \
           "(VAULTTMPFS_PODS_DIR) is not visible here" in refused.stderr, refused.stderr
    assert bao.lookup_accessor(accessor) is not None and bao.lookup_accessor(auth["accessor"]) is not None

    (root / "pods-elsewhere").rename(pods)
    done = run("uninstall")
    assert done.returncode == 0, done.stderr
    assert bao.lookup_accessor(accessor) is None and bao.lookup_accessor(auth["accessor"]) is None
