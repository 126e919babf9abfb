"""Case b: the CSI variant (installer/k8s/variants/csi) as it ships: the agent container is the CSI node
plugin, registered by the real csi-node-driver-registrar, probed by the real livenessprobe."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from vaulttmpfs.csi import csi_pb2
from vaulttmpfs.engine.state import StateStore

from ..csikubelet import CsiKubelet
from ..kubelet import Kubelet
from ..kubelet import Pod as KubeletPod
from .cluster import FS_GROUP, app_pod, deploy, installed_driver, small_image
from .cri import NODE_NAME, Pod, find, probe, render

REGISTRY = Path("/var/lib/kubelet/plugins_registry")
DRIVER = "vaulttmpfs.cloudwatt.com"


def registration_stubs(work: Path):
    out = work / "pluginregistration"
    out.mkdir(exist_ok=True)
    proto = Path(__file__).with_name("pluginregistration.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto.parent}", f"--python_out={out}",
                    f"--grpc_python_out={out}", proto.name], check=True)
    sys.path.insert(0, str(out))
    return importlib.import_module("pluginregistration_pb2"), importlib.import_module("pluginregistration_pb2_grpc")


@pytest.fixture(scope="module")
def csi(node):
    """The sidecar images the variant names, made from SIDECARS_DIR's binaries (static: nothing else in them).
    The tags are the manifest's, whatever release SIDECARS_DIR holds (../shared/bin: newer ones)."""
    from . import node as nodes

    docs = render("variants/csi")
    for container in find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][1:]:
        binary = {"node-driver-registrar": "csi-node-driver-registrar",
                  "liveness-probe": "livenessprobe"}[container["name"]]
        path = nodes.sidecar(binary, node.work / "bin")
        archive = small_image(node.work, container["image"], json.dumps([f"/{binary}"]),
                              ["--file", f"/{binary}={path}"])
        node.containerd.import_image(archive)
    return docs


def register(node, timeout: float = 60) -> tuple[str, CsiKubelet]:
    """pluginwatcher + operation_generator.go GenerateRegisterPluginFunc + csi_plugin.go RegisterPlugin:
    the kubelet finds <name>-reg.sock in plugins_registry, dials it, GetInfo, validates the versions,
    NodeGetInfo at the endpoint it was given, then NotifyRegistrationStatus."""
    pb, pb_grpc = registration_stubs(node.work)
    socket = REGISTRY / f"{DRIVER}-reg.sock"
    deadline = time.monotonic() + timeout
    while not socket.exists():
        assert time.monotonic() < deadline, f"no registration socket in {REGISTRY}: {os.listdir(REGISTRY)}"
        time.sleep(0.2)
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        registration = pb_grpc.RegistrationStub(channel)
        info = registration.GetInfo(pb.InfoRequest(), timeout=10)
        assert (info.type, info.name) == ("CSIPlugin", DRIVER)
        assert any(v.startswith("1.") or v == "v1" or v.startswith("v1.") for v in info.supported_versions), info
        plugin = CsiKubelet(info.endpoint, Path("/var/lib/kubelet/pods"), NODE_NAME)
        plugin.wait_ready(30)
        node_id = plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id
        registration.NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=True), timeout=10)
    return node_id, plugin


def mounted_in(pid: int, path: Path) -> bool:
    """Whether `path` is a mount point in the mount namespace of process `pid`."""
    return any(line.split()[4] == str(path) for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())


def test_csi_plugin_registers_publishes_into_the_app_and_unpublish_revokes(node, csi):
    agent, _ = deploy(node, "variants/csi")
    node_id, plugin = register(node)
    assert node_id
    registrar_log = node.runtime.logs(agent.containers["node-driver-registrar"])
    assert "Received NotifyRegistrationStatus call\" status=\"plugin_registered:true" in registrar_log, registrar_log

    # The agent's liveness probe, as the kubelet makes it: the real livenessprobe answers for the plugin while
    # it serves (it calls Probe on csi.sock), on the node's loopback.
    assert probe(agent, "vaulttmpfs", "livenessProbe", timeout=30) == 200

    app = app_pod(node.bao.addr, "app-csi", {"csi": {"driver": DRIVER, "readOnly": True,
                                                     "volumeAttributes": {"vault/policies": "nginx"}}})
    fs_group = FS_GROUP if plugin.supports_mount_group() else None
    targets = {}

    def publish(pod: Pod) -> None:  # csi_mounter.go SetUpAt, before the pod's containers start
        for volume in pod.spec["volumes"]:
            if "csi" in volume:
                target = plugin.publish(KubeletPod(pod.uid, pod.name, pod.namespace), volume["csi"]["volumeAttributes"],
                                        volume=volume["name"], fs_group=fs_group,
                                        read_only=volume["csi"].get("readOnly", False))
                assert target == pod.volume_path(volume)
                targets[volume["name"]] = target

    node.runtime.run(app, before_containers=publish)
    target = targets["vault"]
    agent_pid = node.runtime.pid(agent.containers["vaulttmpfs"])
    # The tmpfs the plugin mounted in its container reached the host (Bidirectional on a shared mount).
    assert os.path.ismount(target) and mounted_in(agent_pid, target)
    status = node.runtime.wait_exit(app.containers["token"], 60)
    assert status["exitCode"] == 0, node.runtime.logs(app.containers["token"])
    out = app.volume_path(app.spec["volumes"][1])
    accessor = json.loads((out / "kubernetes-vault.json").read_text())["accessor"]
    me = node.bao.request("GET", "auth/token/lookup-self", token=(out / "token").read_text().strip())["data"]
    assert "nginx" in me["policies"] and me["accessor"] == accessor

    node.runtime.stop(app)
    plugin.teardown(KubeletPod(app.uid, app.name, app.namespace), volume="vault")
    assert node.bao.lookup_accessor(accessor) is None
    assert not os.path.ismount(target) and not mounted_in(agent_pid, target)

    # The plugin process killed: the agent's liveness probe fails (answered by the sidecar, not refused), so the
    # kubelet restarts the agent container.
    os.kill(agent_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while probe(agent, "vaulttmpfs", "livenessProbe") == 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert probe(agent, "vaulttmpfs", "livenessProbe") not in (200, 0)
    plugin.close()
    node.runtime.stop(agent)


def until(condition, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.3)


def new_generator_token(node) -> None:
    """The operator's step 5 again, for the cases after an uninstall (node.generator updated in place)."""
    generator = node.bao.generator_token(ttl="2h")
    path = Path("/etc/vaulttmpfs/vaulttoken")
    path.write_text(generator["client_token"] + "\n")
    path.chmod(0o600)
    node.generator.clear()
    node.generator.update(generator)


def test_csi_uninstall_serves_the_teardown_of_the_pods_holding_it_up(node, csi):
    """variants/csi-uninstall after variants/csi. The agent was the CSI socket's only server: uninstall, in its
    place, serves the teardown (registered by the same sidecar) until the pods using the volume are gone, else
    their unpublish got UNAVAILABLE, the pods stayed Terminating with their tokens alive and uninstall refused."""
    agent, daemonset = deploy(node, "variants/csi")
    _, plugin = register(node)
    pod = Kubelet.new_pod("held", "shop")
    target = plugin.publish(pod, {"vault/policies": "nginx"})
    accessor = StateStore("/var/lib/vaulttmpfs").read_volume(str(target)).accessor
    plugin.close()
    node.runtime.stop(agent)  # the rollout: the node's old pod goes, then the new one starts
    (REGISTRY / f"{DRIVER}-reg.sock").unlink(missing_ok=True)  # the old registrar's, gone with it

    uninstall, _ = deploy(node, "variants/csi-uninstall")
    cid = uninstall.containers["vaulttmpfs"]
    until(lambda: pod.uid in node.runtime.logs(cid), what="the refusal naming the pod, in the container's log")
    assert "serves their CSI teardown" in node.runtime.logs(cid)
    assert probe(uninstall, "vaulttmpfs", "readinessProbe") == 503
    assert probe(uninstall, "vaulttmpfs", "livenessProbe", timeout=30) == 200  # Probe answered on csi.sock
    _, plugin = register(node)
    with pytest.raises(grpc.RpcError, match="being uninstalled"):
        plugin.publish(Kubelet.new_pod("late", "shop"), {"vault/policies": "nginx"})

    plugin.teardown(pod)  # the pod deleted: the kubelet's NodeUnpublishVolume, served by uninstall
    assert node.bao.lookup_accessor(accessor) is None and not os.path.ismount(target)
    assert probe(uninstall, "vaulttmpfs", "readinessProbe", timeout=60) == 200  # its next try: done
    assert not installed_driver(daemonset).parent.exists()
    assert node.bao.lookup_accessor(node.generator["accessor"]) is None
    plugin.close()
    node.runtime.stop(uninstall)
    new_generator_token(node)
