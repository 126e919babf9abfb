"""Case a: the plain FlexVolume DaemonSet (installer/k8s/base) as it ships, on a real container runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..kubelet import Kubelet
from ..kubelet import Pod as KubeletPod
from .cluster import FS_GROUP, app_pod, deploy, installed_driver, kubelet_for
from .cri import Pod, probe

DRIVER_LOG = "/var/log/vaulttmpfs.log"  # the driver's default VAULTTMPFS_LOG_FILE, on the host


def mount_flex_volumes(kubelet: Kubelet, pod: Pod) -> dict[str, Path]:
    """operation_generator.go MountVolume, for each flexVolume of the pod, before its containers start."""
    mounted = {}
    fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
    for volume in pod.spec["volumes"]:
        if "flexVolume" in volume:
            flex = volume["flexVolume"]
            reply, path = kubelet.mount(KubeletPod(pod.uid, pod.name, pod.namespace), flex.get("options", {}),
                                        volume=volume["name"], fs_group=fs_group, read_only=bool(flex.get("readOnly")))
            assert reply.ok, reply.output
            assert path == pod.volume_path(volume)
            mounted[volume["name"]] = path
    return mounted


def run_app(node, kubelet: Kubelet) -> tuple[Pod, dict[str, Path], dict]:
    """The app pod: volume mounted by the installed driver, then `vaulttmpfs token` unwraps it in the container."""
    app = app_pod(node.bao.addr, "app", {"flexVolume": {"driver": "cloudwatt/vaulttmpfs", "fsType": "tmpfs",
                                                         "options": {"vault/policies": "nginx"}}})
    mounted: dict[str, Path] = {}
    node.runtime.run(app, before_containers=lambda pod: mounted.update(mount_flex_volumes(kubelet, pod)))
    status = node.runtime.wait_exit(app.containers["token"], 60)
    assert status["exitCode"] == 0, node.runtime.logs(app.containers["token"])
    out = app.volume_path(app.spec["volumes"][1])
    record = json.loads((out / "kubernetes-vault.json").read_text())
    token = (out / "token").read_text().strip()
    # The unwrapped token is the pod's own, with the policy the pod asked for.
    me = node.bao.request("GET", "auth/token/lookup-self", token=token)["data"]
    assert "nginx" in me["policies"] and me["accessor"] == record["accessor"]
    return app, mounted, me


def cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def test_flexvolume_daemonset_installs_the_driver_and_the_kubelet_mounts_with_it(node):
    agent, daemonset = deploy(node, "base")
    driver = installed_driver(daemonset)
    # The install init container put the bundle into the host's plugin dir; the agent is up.
    assert os.access(driver, os.X_OK) and driver.is_symlink()
    assert probe(agent, "vaulttmpfs", "readinessProbe", timeout=30) == 200
    assert probe(agent, "vaulttmpfs", "livenessProbe", timeout=30) == 200
    # The agent container: read-only root, no capability at all, not privileged.
    cid = agent.containers["vaulttmpfs"]
    spec = node.runtime.inspect(cid)["info"]["runtimeSpec"]
    assert spec["root"]["readonly"] is True
    assert cap_eff(node.runtime.pid(cid)) == 0
    assert not spec["process"].get("capabilities", {}).get("bounding")

    kubelet = kubelet_for(driver)
    assert kubelet.init().body == {"status": "Success", "capabilities": {"attach": False, "fsGroup": False}}
    app, mounted, me = run_app(node, kubelet)
    # The files the app read: 0440 root:<fsGroup> on a tmpfs the driver mounted on the host.
    volume = mounted["vault"]
    assert os.path.ismount(volume)
    for name in os.listdir(volume):
        st = (volume / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, FS_GROUP, 0o440), name

    # Pod deleted: containers and sandbox stopped, then the kubelet tears the volume down.
    node.runtime.stop(app)
    assert kubelet.teardown(volume).ok
    # Both calls were the agent container's to make in Vault (its broker), not the exec's standalone fallback.
    calls = [line for line in map(json.loads, Path(DRIVER_LOG).read_text().splitlines())
             if line.get("event") == "driver call" and line.get("dir") == str(volume)]
    assert [(c["verb"], c.get("vault")) for c in calls] == [("mount", "broker"), ("unmount", "broker")], calls
    assert not volume.exists()
    assert node.bao.lookup_accessor(me["accessor"]) is None  # unmount revoked the pod's token
    node.runtime.stop(agent)


def test_containerd_imports_the_image_as_make_image_built_it(node):
    """`ctr images import` takes the archive as it is: same name, same manifest digest."""
    import tarfile

    import vaulttmpfs

    with tarfile.open(node.installer_image) as tar:
        [manifest] = json.load(tar.extractfile("index.json"))["manifests"]
    listed = node.containerd.ctr("images", "ls").stdout.split("\n")
    name = f"docker.io/library/vaulttmpfs-installer:{vaulttmpfs.__version__}"
    assert manifest["annotations"]["io.containerd.image.name"] == name
    assert any(line.split()[:1] == [name] and manifest["digest"] in line.split() for line in listed), listed
