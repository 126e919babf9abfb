"""Cases c and d: an upgrade rolled out under a mounted volume, the agent killed and restarted, and
the uninstall variant, each with the FlexVolume DaemonSet as rendered and the driver it installs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from vaulttmpfs.engine.state import StateStore

from ..kubelet import Kubelet
from ..kubelet import Pod as KubeletPod
from .cluster import FS_GROUP, deploy, installed_driver, kubelet_for
from .cri import REPO, probe

STATE_DIR = "/var/lib/vaulttmpfs"  # the ConfigMap's VAULTTMPFS_STATE_DIR, a hostPath at the same path
NEW_TAG = "0.1.1-e2e"


def mount(kubelet: Kubelet, name: str) -> tuple[KubeletPod, Path, str]:
    pod = Kubelet.new_pod(name)
    reply, path = kubelet.mount(pod, {"vault/policies": "nginx"}, fs_group=FS_GROUP)
    assert reply.ok, reply.output
    return pod, path, StateStore(STATE_DIR).read_volume(str(path)).accessor


def until(condition, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.2)


def second_version(node) -> None:
    """A second installer image: `make image` of a bundle that differs (one file added), under a new tag."""
    bundle = node.work / "bundle-v2"
    if not bundle.exists():
        shutil.copytree(REPO / "dist/vaulttmpfs", bundle, symlinks=True)
        (bundle / ".vaulttmpfs-lib" / "e2e-second-version").write_text(NEW_TAG + "\n")
        out = node.work / "image-v2"
        subprocess.run(["make", "-s", "-C", str(REPO), "image", f"BUNDLE={bundle}", f"IMAGE={out}/image.tar",
                        f"ROOTFS={out}/rootfs.tar", f"IMAGE_CONTENTS={out}/contents.txt",
                        f"IMAGE_TAG=vaulttmpfs-installer:{NEW_TAG}"], check=True, capture_output=True)
        node.containerd.import_image(out / "image.tar")


def test_upgrade_rolls_out_under_a_mounted_volume(node, tmp_path):
    old, daemonset = deploy(node, "base")
    driver = installed_driver(daemonset)
    kubelet = kubelet_for(driver)
    first = os.readlink(driver)
    pod, path, accessor = mount(kubelet, "before-upgrade")

    second_version(node)
    # The documented way to a new version: the kustomization's images: newTag (installer/README.md).
    base = os.path.relpath(REPO / "installer/k8s/base", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{base}]\nimages:\n  - name: vaulttmpfs-installer\n    newTag: \"{NEW_TAG}\"\n")
    # RollingUpdate, maxUnavailable 1: the node's old pod goes, then the new one starts.
    node.runtime.stop(old)
    new, new_daemonset = deploy(node, tmp_path)
    assert {c["image"] for c in new.all_containers()} == {f"vaulttmpfs-installer:{NEW_TAG}"}
    assert probe(new, "vaulttmpfs", "readinessProbe", timeout=30) == 200
    second = os.readlink(driver)
    assert second != first  # the new bundle is the one the kubelet now runs ...
    assert (driver.parent / first).is_file()  # ... the previous one kept for calls still running

    # The volume mounted under the old version: still there, its token alive; unmount under the new one.
    assert os.path.ismount(path) and node.bao.lookup_accessor(accessor)
    assert kubelet.teardown(path).ok
    assert node.bao.lookup_accessor(accessor) is None and not path.exists()
    # And new mounts work under the new version.
    pod, path, accessor = mount(kubelet, "after-upgrade")
    assert kubelet.teardown(path).ok and node.bao.lookup_accessor(accessor) is None
    node.runtime.stop(new)


def test_agent_killed_and_restarted_keeps_volumes_retries_revocations_and_reconciles(node):
    agent, daemonset = deploy(node, "base", VAULTTMPFS_RETRY_INTERVAL="1s", VAULTTMPFS_RECONCILE_INTERVAL="1s")
    kubelet = kubelet_for(installed_driver(daemonset))
    assert probe(agent, "vaulttmpfs", "readinessProbe", timeout=30) == 200
    kept_pod, kept, kept_accessor = mount(kubelet, "kept")
    queued_pod, queued, queued_accessor = mount(kubelet, "queued")
    orphan_pod, orphan, orphan_accessor = mount(kubelet, "orphan")

    cid = agent.containers["vaulttmpfs"]
    os.kill(node.runtime.pid(cid), signal.SIGKILL)
    assert node.runtime.wait_exit(cid, 30)["exitCode"] != 0
    # While the agent is down: an unmount with Vault unreachable (the kubelet's environment wins over the
    # config file) succeeds and queues the revocation; a pod dir removed without unmount is an orphan.
    reply = kubelet.unmount(queued, env={**kubelet.env, "VAULT_ADDR": "http://127.0.0.1:9"})
    assert reply.ok, reply.output
    os.rmdir(queued)
    assert queued_accessor in {r["accessor"] for r in StateStore(STATE_DIR).list_pending()}
    subprocess.run(["umount", str(orphan)], check=True)
    shutil.rmtree(kubelet.pods_dir / orphan_pod.uid)
    assert node.bao.lookup_accessor(queued_accessor) and node.bao.lookup_accessor(orphan_accessor)

    node.runtime.restart(agent, "vaulttmpfs")  # restartPolicy Always
    assert probe(agent, "vaulttmpfs", "readinessProbe", timeout=30) == 200
    until(lambda: node.bao.lookup_accessor(queued_accessor) is None, what="the queued revocation retried")
    until(lambda: node.bao.lookup_accessor(orphan_accessor) is None, what="the orphan reconciled")
    # The volume mounted before the kill never noticed.
    assert os.path.ismount(kept) and node.bao.lookup_accessor(kept_accessor)
    assert kubelet.teardown(kept).ok and node.bao.lookup_accessor(kept_accessor) is None
    node.runtime.stop(agent)


def test_uninstall_variant_refuses_while_mounted_then_removes_everything(node):
    """installer/k8s/variants/uninstall, its documented steps: pods using the volume go first. Uninstall runs
    in the agent's place, trying again until it succeeds: not Ready until then, Ready once done."""
    agent, daemonset = deploy(node, "base")
    kubelet = kubelet_for(installed_driver(daemonset))
    pod, path, accessor = mount(kubelet, "still-here")
    node.runtime.stop(agent)

    uninstall, _ = deploy(node, "variants/uninstall")
    cid = uninstall.containers["vaulttmpfs"]
    until(lambda: pod.uid in node.runtime.logs(cid), what="the refusal naming the pod, in the container's log")
    assert probe(uninstall, "vaulttmpfs", "readinessProbe") == 503
    assert os.access(installed_driver(daemonset), os.X_OK) and node.bao.lookup_accessor(node.generator["accessor"])

    assert kubelet.teardown(path).ok and node.bao.lookup_accessor(accessor) is None
    assert probe(uninstall, "vaulttmpfs", "readinessProbe", timeout=60) == 200  # its next try (every 10 s)
    assert not installed_driver(daemonset).parent.exists()
    assert node.bao.lookup_accessor(node.generator["accessor"]) is None
    assert not Path("/etc/vaulttmpfs/vaulttoken").exists()
    # Then the pod only idles, with nothing to renew or reinstall.
    assert node.runtime.state(cid)["state"] == "CONTAINER_RUNNING"
    node.runtime.stop(uninstall)
