"""`vaulttmpfs uninstall` on a node whose kubelet execs the installed build (real OpenBao, real tmpfs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest

from .conftest import driver_env, generator_file
from .csikubelet import new_pod
from .csinode import CsiNode
from .kubelet import Kubelet
from .vaultserver import REPO, dies_with_parent, free_port

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
    assert "the generator token was left alive and nothing removed: pass --plugin-dir" in refused.stderr
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


def health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def wait_for_health(port: int, done, what: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = health(port)
        if done(status, body):
            return body
        assert time.monotonic() < deadline, f"not within {timeout}s: {what} (last: {status} {body})"
        time.sleep(0.2)


def test_uninstall_wait_serves_the_csi_teardown_so_the_pods_holding_it_up_can_go(bao, driver_cmd, tmp_path,
                                                                               log_dir):
    """The uninstall variant with csi: the agent, the CSI socket's only server, is replaced. Uninstall must serve
    NodeUnpublishVolume meanwhile, or a deleted pod stays Terminating, its token alive, and uninstall refuses
    for ever; it makes no new volume; once done it answers /healthz 200 (Ready) and idles."""
    root = tmp_path / "node"
    root.mkdir()
    token_path = tmp_path / "vaulttoken"
    auth = generator_file(bao, token_path, ttl="1h")
    plugin_dir = tmp_path / "plugins"
    node = CsiNode(driver_cmd, bao, {"path": str(token_path)}, root, log_dir,
                   VAULTTMPFS_PLUGIN_DIR=str(plugin_dir)).start()
    try:
        # The csi variant's install step: the FlexVolume driver too (uninstall removes it).
        assert subprocess.run([*driver_cmd, "install", "--source", str(REPO / "dist" / "vaulttmpfs")], env=node.env,
                              capture_output=True, timeout=120).returncode == 0
        pod = new_pod("web", "shop")
        target = node.kubelet.publish(pod, {"vault/policies": "nginx"})
        accessor = json.loads((target / "vault-token.json").read_text())["wrapped_accessor"]
        assert node.agent.terminate() == 0  # the rollout to the uninstall variant stops the agent

        once = subprocess.run([*driver_cmd, "uninstall"], env={**node.env, "VAULTTMPFS_CSI_ENDPOINT": ""},
                              capture_output=True, text=True, timeout=120)
        assert once.returncode == 1 and "held by: shop/web" in once.stderr
        assert "the kubelet tears CSI volumes down only through the CSI plugin" in once.stderr, once.stderr

        port = free_port()
        # As the DaemonSet's container runs it: the CSI endpoint and the health address from its environment.
        waiting = subprocess.Popen([*driver_cmd, "uninstall", "--wait", "--wait-interval", "1s"],
                                   env={**node.env, "VAULTTMPFS_HEALTH_ADDR": f"127.0.0.1:{port}"},
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=dies_with_parent())
        try:
            body = wait_for_health(port, lambda status, body: status == 503 and body["uninstall"]["last_refusal"],
                                   "a refusal reported")
            refusal = body["uninstall"]["last_refusal"]
            assert "held by: shop/web" in refusal and "meanwhile this process serves their CSI teardown" in refusal
            node.kubelet.wait_ready()
            with pytest.raises(grpc.RpcError, match="being uninstalled from node"):
                node.kubelet.publish(new_pod("late", "shop"), {"vault/policies": "nginx"})
            assert node.kubelet.publish(pod, {"vault/policies": "nginx"}) == target  # a republish still answers

            node.kubelet.teardown(pod)  # the pod deleted: the kubelet's NodeUnpublishVolume
            assert bao.lookup_accessor(accessor) is None
            body = wait_for_health(port, lambda status, body: status == 200, "uninstalled")
            assert body["uninstall"]["uninstalled"] is True
            assert bao.lookup_accessor(auth["accessor"]) is None and not token_path.exists()
            assert os.listdir(plugin_dir) == []
            time.sleep(1.5)
            assert waiting.poll() is None  # it idles: a DaemonSet's container must not exit
        finally:
            waiting.send_signal(signal.SIGTERM)
            out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert "not uninstalled yet" in err and "generator token revoked" in out
        assert auth["client_token"] not in out + err
    finally:
        node.stop()
