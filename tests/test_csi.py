"""The CSI node plugin end to end: `vaulttmpfs agent --csi-endpoint` as a real process, called over its
unix socket exactly as the kubelet calls it (tests/csikubelet.py), against real OpenBao and real tmpfs.

The same behaviour list as the FlexVolume suite (test_driver.py), plus what CSI adds: identity from
the kubelet's csi.storage.k8s.io/* keys that a pod cannot forge, gRPC status codes, the target dir
the plugin creates and deletes, and an agent restart between publish and unpublish.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from vaulttmpfs.csi import csi_pb2

from .agents import AgentProcess, scrape
from .conftest import BUILD_EXE, remember_secret, source_cmd
from .csikubelet import CsiKubelet, new_pod, volume_handle
from .csinode import NODE_NAME, CsiNode
from .faultserver import CREATE, FaultServer, wait_for
from .jwtsign import Signer
from .kubelet import mount_entry
from .manifests import SINCE, documents, render, rendered, validate
from .vaultserver import REPO, closed_addr, free_port
from .volumes import fill, read_volume, small_state_fs

NGINX = {"vault/policies": "nginx"}
@pytest.fixture(scope="module")
def node(bao, generator, log_dir, tmp_path_factory):
    port = free_port()
    node = CsiNode(source_cmd(), bao, generator, tmp_path_factory.mktemp("csi-node"), log_dir,
                   VAULTTMPFS_METRICS_ADDR=f"127.0.0.1:{port}").start()
    node.metrics_port = port
    yield node
    node.stop()


@pytest.fixture
def kubelet(node) -> CsiKubelet:
    return node.kubelet


def unwrap(bao, path: Path) -> dict:
    auth = bao.unwrap(read_volume(path)[0])["auth"]
    remember_secret(auth["client_token"])
    return auth


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    assert failure.value.code() == code, failure.value.details()
    return failure.value.details()


def pod_tokens(bao) -> set[str]:
    return {a for a in bao.accessors() if ((bao.lookup_accessor(a) or {}).get("meta") or {}).get("created_by")
            == "vaulttmpfs"}


def state_records(node: CsiNode) -> list[Path]:
    return sorted((node.root / "state" / "volumes").glob("*.json"))


def test_identity_capabilities_and_socket(node, kubelet):
    info = kubelet.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    assert info.name == "vaulttmpfs.cloudwatt.com" and info.vendor_version
    assert kubelet.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value is True
    plugin_caps = kubelet.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=10)
    assert list(plugin_caps.capabilities) == []  # node-only plugin
    assert list(kubelet.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10).capabilities) == []
    caps = kubelet.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=10).capabilities
    assert [c.rpc.type for c in caps] == [csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP]  # no staging
    assert kubelet.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id == NODE_NAME
    info = os.lstat(node.socket)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
    assert os.listdir(node.sock_dir) == ["csi.sock"]  # nothing else beside it (the spec's rule)


def test_publish_writes_a_wrapped_token_for_the_pod(node, kubelet, bao):
    pod = new_pod("nginx-1", namespace="shop", service_account="web")
    assert kubelet.supports_mount_group()  # so the kubelet hands over fsGroup, as here
    path = kubelet.publish(pod, NGINX, fs_group=2000, read_only=True)

    entry = mount_entry(path)
    assert entry["fstype"] == "tmpfs" and entry["source"] == "vaulttmpfs"
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(entry["options"])
    assert "size=1024k" in entry["super_options"] and "mode=750" in entry["super_options"]
    assert sorted(os.listdir(path)) == ["vault-token", "vault-token.json"]
    for name in ("vault-token", "vault-token.json"):
        info = (path / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o440 and info.st_uid == 0 and info.st_gid == 2000
    with pytest.raises(OSError):
        (path / "x").write_text("")  # readOnly: really read-only

    token, wrap_info = read_volume(path)
    assert wrap_info["creation_path"] == "auth/token/create/applications" and wrap_info["ttl"] == 300
    auth = unwrap(bao, path)
    assert sorted(auth["policies"]) == ["default", "nginx"]
    assert auth["accessor"] == wrap_info["wrapped_accessor"]
    assert auth["metadata"] == {"created_by": "vaulttmpfs", "namespace": "shop", "pod": "nginx-1",
                                "pod_uid": pod.uid, "service_account": "web", "volume": "vault",
                                "node": NODE_NAME}

    kubelet.unpublish(pod)
    assert not path.exists()  # the plugin deletes the target path it created (CSI spec)
    assert (path.parent / "vol_data.json").exists()  # the kubelet's own file is left to it
    assert bao.lookup_accessor(auth["accessor"]) is None
    assert bao.lookup_accessor(wrap_info["accessor"]) is None
    kubelet.unpublish(pod)  # again: the kubelet retries until OK; nothing left is still OK
    kubelet.teardown(pod)
    assert not path.parent.exists() and state_records(node) == []


def test_without_fsgroup_files_are_root_only_and_writable_mount(node, kubelet):
    pod = new_pod()
    path = kubelet.publish(pod, {"vault/policies": "other"})
    entry = mount_entry(path)
    assert "rw" in entry["options"] and "mode=700" in entry["super_options"]
    for name in ("vault-token", "vault-token.json"):
        info = (path / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o400 and info.st_gid == 0
    remember_secret((path / "vault-token").read_text())
    kubelet.teardown(pod)


def test_sixty_republishes_mint_nothing_and_call_vault_never(node, kubelet, bao):
    """requiresRepublish: a republish (same volume id and target path) about every minute."""
    pod = new_pod(namespace="shop")
    path = kubelet.publish(pod, NGINX)
    first = read_volume(path)
    before, calls = pod_tokens(bao), vault_round_trips(node.metrics_port)
    for _ in range(60):
        assert kubelet.publish(pod, NGINX) == path  # OK, nothing new
    assert read_volume(path) == first
    assert pod_tokens(bao) == before and vault_round_trips(node.metrics_port) == calls
    kubelet.teardown(pod)
    assert bao.lookup_accessor(first[1]["wrapped_accessor"]) is None


@pytest.mark.parametrize("first, second", [
    ({"read_only": False}, {"read_only": True}),
    ({"read_only": True, "fs_group": 2000}, {"read_only": True, "fs_group": 3000}),
    ({"fs_group": 2000}, {}),
])
def test_republish_asking_for_another_readonly_or_fsgroup_is_already_exists(node, kubelet, bao, first, second):
    """The spec: published at this target path but incompatible with the capability or readonly flag."""
    pod = new_pod(namespace="shop")
    path = kubelet.publish(pod, NGINX, **first)
    made = read_volume(path)
    options = mount_entry(path)["options"]
    before = pod_tokens(bao)
    message = refused(lambda: kubelet.publish(pod, NGINX, **second), grpc.StatusCode.ALREADY_EXISTS)
    assert "already published with" in message and "unpublish it first" in message
    assert ("readOnly=true" in message) == (first.get("read_only") or second.get("read_only", False))
    # Nothing was remade, minted or revoked: the pod keeps the volume it has.
    assert os.path.ismount(path) and read_volume(path) == made and mount_entry(path)["options"] == options
    assert pod_tokens(bao) == before and bao.lookup_accessor(made[1]["wrapped_accessor"]) is not None
    assert kubelet.publish(pod, NGINX, **first) == path  # the same request again is still OK
    kubelet.teardown(pod)
    assert bao.lookup_accessor(made[1]["wrapped_accessor"]) is None


@pytest.mark.parametrize("attributes, shown", [
    ({"vault/policies": "other"}, "vault/policies=other"),
    ({**NGINX, "vault/unwrap": "true"}, "vault/unwrap=true"),
    ({**NGINX, "vault/role": "applications2"}, "vault/role=applications2"),
])
def test_republish_asking_for_another_token_is_already_exists(node, kubelet, bao, attributes, shown):
    """The spec's ALREADY_EXISTS for parameters incompatible with the published volume: it used to
    answer OK and leave the pod the token minted for the first attributes."""
    pod = new_pod(namespace="shop")
    path = kubelet.publish(pod, NGINX)
    made, before = read_volume(path), pod_tokens(bao)
    message = refused(lambda: kubelet.publish(pod, attributes), grpc.StatusCode.ALREADY_EXISTS)
    assert shown in message and "unpublish it first" in message
    assert os.path.ismount(path) and read_volume(path) == made and pod_tokens(bao) == before
    assert kubelet.publish(pod, NGINX) == path
    kubelet.teardown(pod)
    assert bao.lookup_accessor(made[1]["wrapped_accessor"]) is None


@pytest.mark.parametrize("mode", ["UNKNOWN", "MULTI_NODE_MULTI_WRITER", "MULTI_NODE_READER_ONLY"])
def test_an_access_mode_other_than_single_node_is_invalid_argument(node, kubelet, bao, mode):
    pod = new_pod(namespace="shop")
    path = kubelet.publish(pod, NGINX)  # the kubelet's own: SINGLE_NODE_WRITER (csi_mounter.go, inline = RWO)
    made, before = read_volume(path), pod_tokens(bao)
    for target in (pod, new_pod(namespace="shop")):  # a republish, and a first publish
        request = kubelet.publish_request(target, NGINX)
        request.volume_capability.access_mode.mode = csi_pb2.VolumeCapability.AccessMode.Mode.Value(mode)
        message = refused(lambda request=request: kubelet.node.NodePublishVolume(request, timeout=30),
                          grpc.StatusCode.INVALID_ARGUMENT)
        assert f"access mode {mode} is not supported" in message
    assert read_volume(path) == made and pod_tokens(bao) == before
    request = kubelet.publish_request(pod, NGINX)
    request.volume_capability.access_mode.mode = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_MULTI_WRITER
    kubelet.node.NodePublishVolume(request, timeout=30)  # what a kubelet sends a plugin that advertises it
    kubelet.teardown(pod)


def test_republish_after_a_reboot_revokes_the_old_token_and_writes_a_fresh_one(node, kubelet, bao):
    pod = new_pod(namespace="shop")
    path = kubelet.publish(pod, NGINX)
    old = read_volume(path)[1]
    subprocess.run(["umount", str(path)], check=True)  # a reboot: the tmpfs is gone, dir and state stay
    assert kubelet.publish(pod, NGINX) == path
    new = read_volume(path)[1]
    assert new["wrapped_accessor"] != old["wrapped_accessor"]
    assert bao.lookup_accessor(old["wrapped_accessor"]) is None and bao.lookup_accessor(old["accessor"]) is None
    kubelet.teardown(pod)
    assert bao.lookup_accessor(new["wrapped_accessor"]) is None


def test_unwrap_attribute_puts_the_plain_token_in_the_volume(node, kubelet, bao):
    pod = new_pod(namespace="shop")
    path = kubelet.publish(pod, {**NGINX, "vault/unwrap": "true"})
    token, info = read_volume(path)
    assert info["unwrapped"] is True and "client_token" not in info
    looked_up = bao.request("GET", "auth/token/lookup-self", token=token)["data"]
    assert sorted(looked_up["policies"]) == ["default", "nginx"] and looked_up["meta"]["pod_uid"] == pod.uid
    kubelet.teardown(pod)
    assert bao.lookup_accessor(info["accessor"]) is None


def test_unpublish_of_a_volume_never_published_is_ok(kubelet):
    kubelet.unpublish(new_pod())


@pytest.mark.parametrize("attributes, kwargs, names", [
    ({}, {}, "'vault/policies' is required"),
    ({"vault/policies": " , "}, {}, "'vault/policies' is empty"),
    ({"vault/policies": "ok,../etc"}, {}, "invalid policy name '../etc'"),
    ({"vault/policies": "other", "vault/role": "a/b"}, {}, "'vault/role' has an invalid role name 'a/b'"),
    ({"vault/polices": "other"}, {}, "unknown attribute 'vault/polices'"),
    ({"vault/policies": "other"}, {"fs_group": "staff"}, "volume_mount_group 'staff' is not a group id"),
    # Digits to str.isdigit, not to the kernel: '²' was an INTERNAL ValueError, '١٢' (Arabic-Indic) gid 12.
    ({"vault/policies": "other"}, {"fs_group": "\u00b2"}, "volume_mount_group '\u00b2' is not a group id"),
    ({"vault/policies": "other"}, {"fs_group": "\u0661\u0662"},
     "volume_mount_group '\u0661\u0662' is not a group id"),
    ({"vault/policies": "other"}, {"fs_group": "9" * 5000}, "volume_mount_group '99999"),  # int(): ValueError
    ({"vault/policies": "other", "vault/unwrap": "maybe"}, {}, "'vault/unwrap' must be \"true\" or \"false\""),
    ({"vault/policies": "other"}, {"pod_info_on_mount": False}, "csi.storage.k8s.io/ephemeral"),
])
def test_bad_attributes_are_invalid_argument_naming_them(node, kubelet, bao, attributes, kwargs, names):
    pod = new_pod()
    before = pod_tokens(bao)
    fs_group = kwargs.pop("fs_group", None)
    request = kubelet.publish_request(pod, attributes, **kwargs)
    if fs_group is not None:
        request.volume_capability.mount.volume_mount_group = fs_group
    message = refused(lambda: kubelet.node.NodePublishVolume(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert names in message
    assert not kubelet.target_path(pod).exists()  # nothing created, nothing mounted
    assert pod_tokens(bao) == before and state_records(node) == []


def test_bad_request_fields_are_invalid_argument(node, kubelet):
    pod = new_pod()
    block = kubelet.publish_request(pod, NGINX)
    block.volume_capability.ClearField("mount")
    block.volume_capability.block.SetInParent()
    wrong_id = kubelet.publish_request(pod, NGINX)
    wrong_id.volume_id = volume_handle(new_pod(), "vault")
    flex_layout = kubelet.publish_request(pod, NGINX)
    flex_layout.target_path = str(kubelet.pods_dir / pod.uid / "volumes" / "cloudwatt~vaulttmpfs" / "vault")
    nul = kubelet.publish_request(pod, NGINX)
    nul.target_path += "\0x"  # was INTERNAL "ValueError: embedded null byte", logged as a bug
    cases = {"block volume": block, "is not the kubelet's handle": wrong_id, "holds a NUL character": nul,
             "is not a pod volume dir <pods dir>/<pod uid>/volumes/kubernetes.io~csi/<name>/mount": flex_layout}
    for expected, request in cases.items():
        message = refused(lambda request=request: kubelet.node.NodePublishVolume(request, timeout=30),
                          grpc.StatusCode.INVALID_ARGUMENT)
        assert expected in message
    assert refused(lambda: kubelet.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="x", target_path="/etc"), timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert "holds a NUL character" in refused(lambda: kubelet.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=nul.volume_id, target_path=nul.target_path), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert os.path.isdir("/etc")
    assert not kubelet.target_path(pod).exists() and state_records(node) == []


def test_unpublish_names_the_volume_it_unmounts(node, kubelet, bao):
    """An unpublish whose volume_id is not the kubelet's handle for its target path, or whose path goes
    through `..` (into another pod's volume, with this pod's handle), is refused and touches nothing:
    it used to unmount the volume and revoke its token."""
    victim, pod = new_pod(namespace="shop"), new_pod(namespace="shop")
    path = kubelet.publish(victim, NGINX)
    info = read_volume(path)[1]
    dotdot = str(kubelet.target_path(pod).parent / ".." / ".." / ".." / ".." / victim.uid / "volumes" /
                 "kubernetes.io~csi" / "vault" / "mount")
    calls = {
        "is not the kubelet's handle": csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_handle(new_pod(), "vault"), target_path=str(path)),
        "has a '..' component": csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_handle(pod, "vault"), target_path=dotdot),
    }
    for expected, request in calls.items():
        message = refused(lambda request=request: kubelet.node.NodeUnpublishVolume(request, timeout=30),
                          grpc.StatusCode.INVALID_ARGUMENT)
        assert expected in message
    publish = kubelet.publish_request(pod, NGINX)
    publish.target_path = dotdot
    assert "has a '..' component" in refused(lambda: kubelet.node.NodePublishVolume(publish, timeout=30),
                                             grpc.StatusCode.INVALID_ARGUMENT)
    assert os.path.ismount(path) and read_volume(path)[1] == info
    assert bao.lookup_accessor(info["wrapped_accessor"]) is not None
    kubelet.teardown(victim)
    assert bao.lookup_accessor(info["wrapped_accessor"]) is None


def test_disallowed_policy_is_permission_denied_without_mount_or_token(node, kubelet, bao):
    before = pod_tokens(bao)
    pod = new_pod(namespace="payments")
    message = refused(lambda: kubelet.publish(pod, NGINX), grpc.StatusCode.PERMISSION_DENIED)
    assert "policy 'nginx' is not bound to service account 'default' in namespace 'payments'" in message
    # Allowed by the bindings, refused by Vault's token role: Vault's own words reach the pod's events.
    message = refused(lambda: kubelet.publish(pod, {"vault/policies": "app-x"}), grpc.StatusCode.PERMISSION_DENIED)
    assert "app-x" in message
    assert not kubelet.target_path(pod).exists() and pod_tokens(bao) == before and state_records(node) == []


def test_a_role_the_generator_may_not_use_is_permission_denied_naming_the_attribute(node, kubelet, bao):
    """It was INTERNAL "the generator token may be expired or revoked ... re-run bootstrap": the node's
    token is fine, the pod's `vault/role` is not one it may use."""
    pod, before = new_pod(namespace="shop"), pod_tokens(bao)
    message = refused(lambda: kubelet.publish(pod, {**NGINX, "vault/role": "nosuchrole"}),
                      grpc.StatusCode.PERMISSION_DENIED)
    assert "`vault/role` 'nosuchrole' is not a role this node may create tokens with" in message
    assert "permission denied" in message and "bootstrap" not in message and "expired" not in message
    assert pod_tokens(bao) == before and not kubelet.target_path(pod).exists() and state_records(node) == []


def test_a_forged_kubelet_attribute_cannot_change_identity(node, kubelet, bao):
    # The pod names itself into namespace "shop" (which may have nginx) in its own volumeAttributes.
    pod = new_pod("intruder", namespace="payments", service_account="robot")
    forged = {"csi.storage.k8s.io/pod.namespace": "shop", "csi.storage.k8s.io/serviceAccount.name": "web",
              "csi.storage.k8s.io/pod.name": "shop-web", "csi.storage.k8s.io/pod.uid": new_pod().uid}
    message = refused(lambda: kubelet.publish(pod, {**NGINX, **forged}), grpc.StatusCode.PERMISSION_DENIED)
    assert "namespace 'payments'" in message  # the kubelet's keys won the merge
    path = kubelet.publish(pod, {"vault/policies": "other", **forged})
    meta = unwrap(bao, path)["metadata"]
    assert (meta["namespace"], meta["pod"], meta["pod_uid"], meta["service_account"]) == \
        ("payments", "intruder", pod.uid, "robot")
    kubelet.teardown(pod)


def test_forged_keys_without_pod_info_from_the_kubelet_are_refused(node, kubelet, bao):
    """A CSIDriver without podInfoOnMount would let the pod's own keys through: the pod cannot know its
    uid when it is written, so the uid check against the target path refuses them."""
    pod = new_pod("intruder", namespace="payments")
    forged = {"csi.storage.k8s.io/pod.namespace": "shop", "csi.storage.k8s.io/serviceAccount.name": "web",
              "csi.storage.k8s.io/pod.name": "web", "csi.storage.k8s.io/pod.uid": new_pod().uid,
              "csi.storage.k8s.io/ephemeral": "true"}
    before = pod_tokens(bao)
    message = refused(lambda: kubelet.publish(pod, {**NGINX, **forged}, pod_info_on_mount=False),
                      grpc.StatusCode.PERMISSION_DENIED)
    assert "does not match the pod uid" in message and "spoofed" in message
    assert pod_tokens(bao) == before and not kubelet.target_path(pod).exists()


def test_twenty_concurrent_publishes_then_unpublishes(node, kubelet, bao):
    pods = [new_pod(f"web-{i}", namespace="shop") for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        paths = list(pool.map(lambda p: kubelet.publish(p, NGINX), pods))
    accessors = [read_volume(p)[1] for p in paths]
    assert len({a["wrapped_accessor"] for a in accessors}) == 20
    assert all(mount_entry(p)["source"] == "vaulttmpfs" for p in paths)
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(kubelet.teardown, pods))
    assert all(bao.lookup_accessor(a["wrapped_accessor"]) is None for a in accessors)
    assert all(bao.lookup_accessor(a["accessor"]) is None for a in accessors)
    assert state_records(node) == []


def test_concurrent_publishes_of_one_volume_mint_once_and_mount_once(node, kubelet, bao):
    """The kubelet retries a publish whose answer it has not had yet: the calls for one volume
    serialise on its lock, one mints, the others find it mounted; unpublish leaves nothing behind."""
    pod = new_pod(namespace="shop")
    before = pod_tokens(bao)
    with ThreadPoolExecutor(6) as pool:
        paths = set(pool.map(lambda _: kubelet.publish(pod, NGINX), range(6)))
    [path] = paths
    minted = pod_tokens(bao) - before
    info = read_volume(path)[1]
    assert minted == {info["wrapped_accessor"]}, minted  # one pod token (its wrapping token aside)
    stacked = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split()[4] == os.path.realpath(path)]
    assert len(stacked) == 1, stacked
    kubelet.teardown(pod)
    assert bao.lookup_accessor(info["wrapped_accessor"]) is None and bao.lookup_accessor(info["accessor"]) is None
    assert not kubelet.target_path(pod).exists() and state_records(node) == []


REVOKE = "/v1/auth/token/revoke-accessor"


def lock_waiters(node: CsiNode) -> int:
    """Calls blocked on a volume's lock in the agent: flock waiters ("->" lines of /proc/locks) on the
    inode of a lock file in its state dir. What a test waits for before letting the lock holder go."""
    inodes = {str(path.stat().st_ino) for path in (node.root / "state" / "volumes").glob("*.lock")}
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line.split() and line.split()[-3].rsplit(":", 1)[-1] in inodes)


def test_a_publish_waiting_on_an_unpublish_of_its_volume_publishes_it_afresh(bao, generator, log_dir, tmp_path):
    """The kubelet republishes a volume while its unpublish is still revoking (a slow Vault): the
    publish waits on the volume's lock, and the target dir the unpublish removes is made again under
    it. It used to be checked before the lock and removed after it: the publish minted a token, then
    failed INTERNAL "No such file or directory" and revoked it."""
    with FaultServer(bao.addr) as fault:
        node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir, VAULT_ADDR=fault.addr).start()
        try:
            kubelet, pod = node.kubelet, new_pod(namespace="shop")
            path = kubelet.publish(pod, NGINX)
            old = read_volume(path)[1]
            fault.add(REVOKE, "delay")  # Vault revokes at once; its answer waits for the release
            with ThreadPoolExecutor(2) as pool:
                unpublish = pool.submit(kubelet.unpublish, pod)
                assert fault.arrived.wait(30)
                creates = fault.count(CREATE)
                publish = pool.submit(kubelet.node.NodePublishVolume, kubelet.publish_request(pod, NGINX), timeout=60)
                assert wait_for(lambda: lock_waiters(node) == 1)
                fault.release.set()
                unpublish.result()
                publish.result()
            fault.clear()
            assert fault.count(CREATE) == creates + 1  # one token for the new volume, none thrown away
            new = read_volume(path)[1]
            assert os.path.ismount(path) and new["wrapped_accessor"] != old["wrapped_accessor"]
            assert bao.lookup_accessor(old["wrapped_accessor"]) is None
            assert bao.lookup_accessor(new["wrapped_accessor"]) is not None
            kubelet.teardown(pod)
            assert bao.lookup_accessor(new["wrapped_accessor"]) is None and state_records(node) == []
        finally:
            fault.release.set()
            node.stop()


def test_a_retried_publish_waiting_on_a_failing_first_attempt_publishes(bao, generator, log_dir, tmp_path):
    """The kubelet retries a publish whose first attempt is still out (its deadline passed); that attempt
    then fails and removes the target dir it made. The retry, waiting on the lock, makes it again and
    publishes (it used to mint, then fail INTERNAL "No such file or directory")."""
    with FaultServer(bao.addr) as fault:
        node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir, VAULT_ADDR=fault.addr).start()
        try:
            kubelet, pod = node.kubelet, new_pod(namespace="shop")
            fault.add(CREATE, "hang", times=1)  # the first create is never answered
            request = kubelet.publish_request(pod, NGINX)
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(kubelet.node.NodePublishVolume, request, timeout=60)
                assert fault.arrived.wait(30)
                retry = pool.submit(kubelet.node.NodePublishVolume, request, timeout=60)
                assert wait_for(lambda: lock_waiters(node) == 1)
                fault.release.set()  # the first create's connection closes without an answer
                with pytest.raises(grpc.RpcError):
                    first.result()
                retry.result()
            path = kubelet.target_path(pod)
            assert fault.count(CREATE) == 2 and os.path.ismount(path)
            info = read_volume(path)[1]
            assert unwrap(bao, path)["metadata"]["pod_uid"] == pod.uid
            kubelet.teardown(pod)
            assert bao.lookup_accessor(info["wrapped_accessor"]) is None
        finally:
            fault.release.set()
            node.stop()


def test_service_account_tokens_in_the_volume_context_never_reach_the_log(node, kubelet):
    """With CSIDriver tokenRequests the kubelet adds the pod's service-account JWT to the volume context."""
    jwt = remember_secret("eyJhbGciOiJSUzI1NiJ9." + uuid.uuid4().hex + "." + uuid.uuid4().hex)
    pod = new_pod(namespace="shop")
    tokens = {"vault": {"token": jwt, "expirationTimestamp": "2030-01-01T00:00:00Z"}}
    kubelet.publish(pod, NGINX, tokens=tokens)
    remember_secret((kubelet.target_path(pod) / "vault-token").read_text())
    refused(lambda: kubelet.publish(new_pod(), {"vault/polices": "x"}, tokens=tokens), grpc.StatusCode.INVALID_ARGUMENT)
    kubelet.teardown(pod)
    log = node.log_file.read_text()
    assert pod.uid in log and jwt not in log and uuid.UUID(jwt.rsplit(".", 1)[1]).hex not in log


def test_calls_are_logged_with_duration_and_outcome(node, kubelet):
    pod = new_pod(namespace="shop")
    kubelet.publish(pod, NGINX)
    kubelet.teardown(pod)
    lines = [json.loads(line) for line in node.log_file.read_text().splitlines() if '"component": "csi"' in line]
    calls = [line for line in lines if line.get("rpc") in ("NodePublishVolume", "NodeUnpublishVolume")
             and line.get("pod_uid", pod.uid) == pod.uid and line.get("target_path") == str(kubelet.target_path(pod))]
    assert [c["rpc"] for c in calls] == ["NodePublishVolume", "NodeUnpublishVolume"]
    assert all(c["code"] == "OK" and c["ms"] >= 0 for c in calls)
    failed = [line for line in lines if line.get("code") == "INVALID_ARGUMENT"]
    assert failed and all(line["error"] for line in failed)


def test_vault_down_is_unavailable_and_nothing_is_mounted(bao, generator, log_dir, tmp_path):
    node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir, VAULT_ADDR=closed_addr()).start()
    try:
        pod = new_pod(namespace="shop")
        message = refused(lambda: node.kubelet.publish(pod, NGINX, timeout=60), grpc.StatusCode.UNAVAILABLE)
        assert "127.0.0.1" in message
        assert not node.kubelet.target_path(pod).exists() and state_records(node) == []
    finally:
        node.stop()


def test_a_full_state_filesystem_is_resource_exhausted_and_nothing_is_minted(bao, generator, log_dir, tmp_path):
    node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir)
    with small_state_fs(tmp_path) as state:
        node.start()
        try:
            fill(state)
            before, pod = pod_tokens(bao), new_pod(namespace="shop")
            # gRPC's code for "perhaps the entire file system is out of space": the kubelet retries it.
            message = refused(lambda: node.kubelet.publish(pod, NGINX), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert f"the state dir {state} (VAULTTMPFS_STATE_DIR) is full" in message, message
            assert pod_tokens(bao) == before and state_records(node) == []
            assert mount_entry(node.kubelet.target_path(pod)) is None
        finally:
            node.stop()


def test_vault_connections_are_kept_alive_and_one_the_server_closed_never_costs_a_token(bao, generator, log_dir,
                                                                                        tmp_path):
    """The agent reuses its Vault connections between calls; a kept-alive connection the server (or a
    gateway) has closed is replaced before a token create goes out, and each publish creates once."""
    with FaultServer(bao.addr, keep_alive=True) as proxy:
        node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir, VAULT_ADDR=proxy.addr).start()
        try:
            pods = [new_pod(namespace="shop") for _ in range(4)]
            for pod in pods[:2]:  # one after the other: served by the same worker thread
                node.kubelet.publish(pod, NGINX)
            creates = [number for path, number in proxy.connections if path.startswith(CREATE)]
            assert len(creates) == 2 and creates[0] == creates[1], proxy.connections  # one connection, reused
            proxy.add(CREATE, "answer-then-close")
            for pod in pods[2:]:
                node.kubelet.publish(pod, NGINX)
            creates = [number for path, number in proxy.connections if path.startswith(CREATE)]
            assert len(creates) == 4 and creates[2] != creates[3], proxy.connections  # never resent, new connection
            for pod in pods:
                info = read_volume(node.kubelet.target_path(pod))[1]
                assert unwrap(bao, node.kubelet.target_path(pod))["metadata"]["pod_uid"] == pod.uid
                node.kubelet.teardown(pod)
                assert bao.lookup_accessor(info["wrapped_accessor"]) is None
        finally:
            node.stop()


def test_agent_restart_keeps_volumes_and_unpublish_still_revokes(bao, generator, log_dir, tmp_path):
    node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir).start()
    try:
        pod = new_pod(namespace="shop")
        path = node.kubelet.publish(pod, NGINX)
        files = {name: (path / name).read_bytes() for name in os.listdir(path)}
        auth = unwrap(bao, path)
        node.kill()  # kill -9: no clean stop, the socket file stays behind
        assert node.socket.exists() and os.path.ismount(path)
        assert {name: (path / name).read_bytes() for name in os.listdir(path)} == files
        assert bao.lookup_accessor(auth["accessor"]) is not None

        node.start()  # replaces the stale socket
        node.kubelet.publish(pod, NGINX)  # the kubelet may republish: still the same volume
        assert {name: (path / name).read_bytes() for name in os.listdir(path)} == files
        second = AgentProcess(source_cmd(), node.env)  # a live socket is never taken over
        assert second.proc.wait(60) == 1 and b"already serves" in second.proc.stdout.read()
        node.kubelet.teardown(pod)
        assert bao.lookup_accessor(auth["accessor"]) is None
    finally:
        node.stop()
    assert not node.socket.exists()  # a clean stop removes its own socket


def test_the_pyinstaller_build_serves_csi(bao, generator, log_dir, tmp_path):
    if not os.access(BUILD_EXE, os.X_OK):
        pytest.fail(f"no PyInstaller build at {BUILD_EXE}: run `make build` first (make test does)")
    node = CsiNode([str(BUILD_EXE)], bao, generator, tmp_path, log_dir).start()
    try:
        pod = new_pod("built", namespace="shop", service_account="web")
        path = node.kubelet.publish(pod, NGINX, fs_group=3000, read_only=True)
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(mount_entry(path)["options"])
        assert (path / "vault-token").stat().st_gid == 3000
        auth = unwrap(bao, path)
        assert sorted(auth["policies"]) == ["default", "nginx"] and auth["metadata"]["pod_uid"] == pod.uid
        message = refused(lambda: node.kubelet.publish(new_pod(), {}), grpc.StatusCode.INVALID_ARGUMENT)
        assert "vault/policies" in message
        node.kubelet.teardown(pod)
        assert bao.lookup_accessor(auth["accessor"]) is None and not path.exists()
    finally:
        node.stop()


def test_the_flexvolume_exec_path_never_imports_grpc():
    probe = ("import sys; from vaulttmpfs import entry; from vaulttmpfs.flexvolume import protocol, relay; "
             "from vaulttmpfs.engine import operation; from vaulttmpfs.vault import client; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# --- Optional: the pod logs itself in with the kubelet's service-account token (tokenRequests) ---

ISSUER = "https://kubernetes.default.svc.cluster.local"
JWT_MOUNT = "csijwt"


class ServiceAccountIssuer(Signer):
    """Signs JWTs shaped like the kubelet's TokenRequest tokens (RS256): bound to a pod's uid."""

    def pod_token(self, pod, audience: str = "vault", ttl: int = 600, **override) -> str:
        bound = {"namespace": pod.namespace, "pod": {"name": pod.name, "uid": pod.uid},
                 "serviceaccount": {"name": pod.service_account, "uid": str(uuid.uuid4())}}
        claims = {"iss": ISSUER, "kubernetes.io": bound, **override}
        subject = f"system:serviceaccount:{pod.namespace}:{pod.service_account}"
        return remember_secret(self.token(subject, audience, ttl, **claims))

    @staticmethod
    def tokens(jwt: str, audience: str = "vault") -> dict:
        return {audience: {"token": jwt, "expirationTimestamp": "2030-01-01T00:00:00Z"}}


@pytest.fixture(scope="module")
def sa_issuer(bao, tmp_path_factory) -> ServiceAccountIssuer:
    """OpenBao's real jwt auth at auth/csijwt trusting a test key, with a role for shop/web pods."""
    issuer = ServiceAccountIssuer(tmp_path_factory.mktemp("sa-issuer"))
    bao.request("POST", f"sys/auth/{JWT_MOUNT}", {"type": "jwt"})
    bao.request("POST", f"auth/{JWT_MOUNT}/config", {"jwt_validation_pubkeys": [issuer.public_pem],
                                                      "bound_issuer": ISSUER})
    bao.request("POST", f"auth/{JWT_MOUNT}/role/shop-web", {
        "role_type": "jwt", "bound_audiences": ["vault"], "user_claim": "sub",
        "bound_subject": "system:serviceaccount:shop:web", "token_policies": ["nginx"], "token_ttl": "10m",
        "claim_mappings": {"/kubernetes.io/pod/uid": "pod_uid", "/kubernetes.io/namespace": "namespace"}})
    yield issuer
    bao.request("DELETE", f"sys/auth/{JWT_MOUNT}")


@pytest.fixture(scope="module")
def jwt_node(bao, generator, log_dir, tmp_path_factory, sa_issuer):
    port = free_port()
    node = CsiNode(source_cmd(), bao, generator, tmp_path_factory.mktemp("csi-jwt-node"), log_dir,
                   VAULTTMPFS_CSI_JWT_AUTH_MOUNT=JWT_MOUNT, VAULTTMPFS_METRICS_ADDR=f"127.0.0.1:{port}").start()
    node.metrics_port = port
    yield node
    node.stop()


def test_the_pod_logs_itself_in_with_its_service_account_token(jwt_node, sa_issuer, bao):
    kubelet = jwt_node.kubelet
    pod = new_pod("web-1", namespace="shop", service_account="web")
    jwt = sa_issuer.pod_token(pod)
    path = kubelet.publish(pod, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(jwt), fs_group=2000)
    wrap_info = read_volume(path)[1]
    assert wrap_info["creation_path"] == f"auth/{JWT_MOUNT}/login"  # a login, response-wrapped
    assert (path / "vault-token").stat().st_gid == 2000
    auth = unwrap(bao, path)
    assert auth["policies"] == ["default", "nginx"]  # what Vault's role gives, not what the pod asked
    assert auth["metadata"]["pod_uid"] == pod.uid and auth["metadata"]["namespace"] == "shop"
    kubelet.teardown(pod)  # the generator token still revokes it
    assert bao.lookup_accessor(auth["accessor"]) is None and bao.lookup_accessor(wrap_info["accessor"]) is None
    assert jwt not in jwt_node.log_file.read_text()


def vault_round_trips(port: int) -> float:
    """Every Vault call the agent made (its own histogram of them, all calls and outcomes)."""
    return sum(v for (name, _labels), v in scrape(port).items()
               if name == "vaulttmpfs_vault_request_duration_seconds_count")


def test_the_pod_logs_in_with_its_token_only_in_secrets(jwt_node, sa_issuer, bao):
    """CSIDriver serviceAccountTokenInSecrets (GA in 1.36): the kubelet puts the tokens in the call's
    `secrets`, not in the volume context; the login works the same, and the JWT reaches no log."""
    kubelet = jwt_node.kubelet
    pod = new_pod("web-s", namespace="shop", service_account="web")
    jwt = sa_issuer.pod_token(pod)
    request = kubelet.publish_request(pod, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(jwt),
                                      tokens_in_secrets=True)
    assert "csi.storage.k8s.io/serviceAccount.tokens" not in request.volume_context
    path = kubelet.publish(pod, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(jwt), tokens_in_secrets=True)
    assert read_volume(path)[1]["creation_path"] == f"auth/{JWT_MOUNT}/login"
    auth = unwrap(bao, path)
    assert auth["metadata"]["pod_uid"] == pod.uid and "nginx" in auth["policies"]
    # Another pod's token in `secrets` is refused as it is in the volume context.
    other = new_pod("web-t", namespace="shop", service_account="web")
    message = refused(lambda: kubelet.publish(other, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(jwt),
                                              tokens_in_secrets=True), grpc.StatusCode.PERMISSION_DENIED)
    assert "bound to pod uid" in message and jwt not in message
    kubelet.teardown(pod)
    assert bao.lookup_accessor(auth["accessor"]) is None
    log = jwt_node.log_file.read_text()
    assert pod.uid in log and jwt not in log and jwt.split(".")[2] not in log


def test_a_pods_own_service_account_tokens_attribute_never_beats_the_kubelets_secrets(jwt_node, sa_issuer, bao):
    """With serviceAccountTokenInSecrets the kubelet merges no tokens key over the volume context, so one
    there is the pod's own volumeAttributes: it used to be read before `secrets`. Refused, naming it."""
    kubelet = jwt_node.kubelet
    pod = new_pod("web-f", namespace="shop", service_account="web")
    before = pod_tokens(bao)
    own = json.dumps(sa_issuer.tokens(sa_issuer.pod_token(pod, ttl=3600)))  # a token the pod came by itself
    attributes = {"vault/role": "shop-web", "csi.storage.k8s.io/serviceAccount.tokens": own}
    message = refused(lambda: kubelet.publish(pod, attributes, tokens=sa_issuer.tokens(sa_issuer.pod_token(pod)),
                                              tokens_in_secrets=True), grpc.StatusCode.INVALID_ARGUMENT)
    assert "'csi.storage.k8s.io/serviceAccount.tokens' is the kubelet's" in message and "volumeAttributes" in message
    assert pod_tokens(bao) == before and not kubelet.target_path(pod).exists()
    assert own not in jwt_node.log_file.read_text()


def test_sixty_republishes_with_fresh_pod_jwts_mint_nothing_and_call_vault_never(jwt_node, sa_issuer, bao):
    """requiresRepublish: the kubelet calls NodePublishVolume about every minute for a mounted volume,
    each time with a fresh service-account token. The pod already holds its Vault token (and renews
    it): a republish answers OK from the node's own record, no mint, no Vault round trip."""
    kubelet = jwt_node.kubelet
    pod = new_pod("web-r", namespace="shop", service_account="web")
    path = kubelet.publish(pod, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(sa_issuer.pod_token(pod)),
                           tokens_in_secrets=True, read_only=True, fs_group=2000)
    made = read_volume(path)
    options = mount_entry(path)["options"]
    tokens, calls = pod_tokens(bao), vault_round_trips(jwt_node.metrics_port)
    for _ in range(60):
        assert kubelet.publish(pod, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(sa_issuer.pod_token(pod)),
                               tokens_in_secrets=True, read_only=True, fs_group=2000) == path
    assert pod_tokens(bao) == tokens  # 0 tokens minted
    assert vault_round_trips(jwt_node.metrics_port) == calls  # 0 Vault calls
    assert read_volume(path) == made and mount_entry(path)["options"] == options  # the same files
    # A republish still checks the fresh JWT is this pod's: another pod's is refused, the volume kept.
    other = sa_issuer.pod_token(new_pod("web-u", namespace="shop", service_account="web"))
    refused(lambda: kubelet.publish(pod, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(other),
                                    tokens_in_secrets=True, read_only=True, fs_group=2000),
            grpc.StatusCode.PERMISSION_DENIED)
    assert read_volume(path) == made and os.path.ismount(path)
    kubelet.teardown(pod)
    assert bao.lookup_accessor(made[1]["wrapped_accessor"]) is None


def test_pod_login_refusals(jwt_node, sa_issuer, bao):
    kubelet = jwt_node.kubelet
    before = pod_tokens(bao)
    pod = new_pod("web-2", namespace="shop", service_account="web")
    # Another pod's token (bound to its uid) is not this pod's.
    other = sa_issuer.pod_token(new_pod("web-3", namespace="shop", service_account="web"))
    message = refused(lambda: kubelet.publish(pod, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(other)),
                      grpc.StatusCode.PERMISSION_DENIED)
    assert "bound to pod uid" in message
    # Vault's role refuses another service account, in Vault's words.
    robot = new_pod("robot", namespace="shop", service_account="robot")
    message = refused(lambda: kubelet.publish(robot, {"vault/role": "shop-web"},
                                              tokens=sa_issuer.tokens(sa_issuer.pod_token(robot))),
                      grpc.StatusCode.PERMISSION_DENIED)
    assert "auth/csijwt" in message and "sub" in message.lower()
    # A token whose kubernetes.io claim is no object is no kubelet's (it was an INTERNAL AttributeError).
    odd = sa_issuer.pod_token(pod, **{"kubernetes.io": "shop"})
    message = refused(lambda: kubelet.publish(pod, {"vault/role": "shop-web"}, tokens=sa_issuer.tokens(odd)),
                      grpc.StatusCode.INVALID_ARGUMENT)
    assert "not a service-account token's" in message and odd not in message
    # No token for the audience: the CSIDriver lacks tokenRequests.
    message = refused(lambda: kubelet.publish(pod, {"vault/role": "shop-web"}), grpc.StatusCode.INVALID_ARGUMENT)
    assert "tokenRequests" in message
    # vault/policies would be silently ignored here: refused instead.
    message = refused(lambda: kubelet.publish(pod, {"vault/role": "shop-web", **NGINX},
                                              tokens=sa_issuer.tokens(sa_issuer.pod_token(pod))),
                      grpc.StatusCode.INVALID_ARGUMENT)
    assert "Vault role" in message
    assert pod_tokens(bao) == before and state_records(jwt_node) == []
    assert not kubelet.target_path(pod).exists() and not kubelet.target_path(robot).exists()


# --- The installer's CSI variant and example, as the real kustomize renders them (see tests/manifests.py) ---

CSI_VARIANT = REPO / "installer" / "k8s" / "variants" / "csi"
RELAY_VARIANT = REPO / "installer" / "k8s" / "variants" / "relay"


def csi_variant() -> tuple[dict, dict]:
    """(DaemonSet, CSIDriver) as `kubectl apply -k installer/k8s/variants/csi` makes them."""
    daemonset, driver = rendered(CSI_VARIANT, "DaemonSet"), rendered(CSI_VARIANT, "CSIDriver")
    for doc in (daemonset, driver):
        validate(doc)
    return daemonset, driver


def extends(small, big) -> bool:
    """BIG is SMALL with fields added and items appended, nothing changed or taken away."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(key in big and extends(value, big[key]) for key, value in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) <= len(big) and all(map(extends, small, big))
    return small == big


def test_csi_variant_is_the_relay_variant_plus_the_csi_node_plugin():
    """The CSI front end needs all that the relay gives the agent (privileged, the pods dir Bidirectional):
    every object of the relay variant is in the CSI variant, only added to, but for the agent's liveness
    probe, which asks the livenessprobe sidecar (its CSI server answering Probe) instead of /livez."""
    relay, csi = render(RELAY_VARIANT), render(CSI_VARIANT)
    probes = [next(doc for doc in docs if doc["kind"] == "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
              .pop("livenessProbe")["httpGet"] for docs in (relay, csi)]
    assert [probe["path"] for probe in probes] == ["/livez", "/healthz"] and probes[1]["port"] == 9808
    by_identity = {(doc["kind"], doc["metadata"]["name"]): doc for doc in csi}
    for doc in relay:
        assert extends(doc, by_identity.pop((doc["kind"], doc["metadata"]["name"]))), doc["kind"]
    assert [kind for kind, _ in by_identity] == ["CSIDriver"]
    assert not extends(rendered(CSI_VARIANT, "DaemonSet"), rendered(RELAY_VARIANT, "DaemonSet"))  # it adds


def test_csidriver_tells_the_kubelet_what_the_plugin_needs():
    from vaulttmpfs.csi import DRIVER_NAME

    _, driver = csi_variant()
    assert driver["kind"] == "CSIDriver" and driver["metadata"]["name"] == DRIVER_NAME
    spec = driver["spec"]
    assert spec["podInfoOnMount"] is True and spec["attachRequired"] is False
    assert spec["volumeLifecycleModes"] == ["Ephemeral"] and spec["fsGroupPolicy"] == "File"


def test_csidriver_carries_the_openshift_profile_restricted_namespaces_may_use():
    """OpenShift admits inline CSI volumes by this label; unlabelled means privileged namespaces only
    (docs/csi.md, "OpenShift", says why restricted is what the volume deserves)."""
    _, driver = csi_variant()
    assert driver["metadata"]["labels"]["security.openshift.io/csi-ephemeral-volume-profile"] == "restricted"


VARIANTS = REPO / "installer" / "k8s" / "variants"


def test_pod_login_variant_asks_for_pod_tokens_in_secrets():
    import kubernetes_validate

    from vaulttmpfs.csi.servicers import JwtLogin

    driver, daemonset = rendered(VARIANTS / "csi-pod-login", "CSIDriver"), rendered(VARIANTS / "csi-pod-login",
                                                                                    "DaemonSet")
    validate(driver, since=SINCE["variants/csi-pod-login"])
    validate(daemonset)
    # serviceAccountTokenInSecrets is in no schema before 1.35: the minimum its comments name is real.
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(driver, "1.34.0", strict=True)
    for path in (VARIANTS / "csi-pod-login", REPO / "installer" / "k8s" / "components" / "csi-pod-login"):
        assert ">= 1.35" in (path / "kustomization.yaml").read_text()
    spec = driver["spec"]
    assert spec["serviceAccountTokenInSecrets"] is True
    assert [r["audience"] for r in spec["tokenRequests"]] == [JwtLogin("jwt").audience]
    env = {e["name"]: e.get("value") for e in daemonset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VAULTTMPFS_CSI_JWT_AUTH_MOUNT"] and env["VAULTTMPFS_CSI_ENDPOINT"]


def test_republish_variant_turns_on_requires_republish_and_nothing_else():
    driver = rendered(VARIANTS / "csi-republish", "CSIDriver")
    validate(driver)
    _, plain = csi_variant()
    assert plain["spec"].pop("requiresRepublish") is False and driver["spec"].pop("requiresRepublish") is True
    assert driver == plain


def test_csi_variant_daemonset_serves_csi_and_the_relay_with_the_sidecars():
    from click.testing import CliRunner

    from vaulttmpfs.cli import cli
    from vaulttmpfs.csi import DRIVER_NAME
    from vaulttmpfs.node.csi_server import socket_path

    daemonset, _ = csi_variant()
    pod = daemonset["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"vaulttmpfs", "node-driver-registrar", "liveness-probe"}
    agent = containers["vaulttmpfs"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["VAULTTMPFS_RELAY"] == "true"  # one DaemonSet, both front ends
    assert "VAULTTMPFS_CSI_ENDPOINT" in {p.envvar for p in cli.commands["agent"].params}
    assert CliRunner().invoke(cli, ["agent", "--help"]).exit_code == 0
    agent_socket = socket_path(env["VAULTTMPFS_CSI_ENDPOINT"])
    assert agent["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounts(container: dict) -> dict:
        found = {m["name"]: m for m in container["volumeMounts"]}
        assert set(found) <= set(volumes)
        return found

    agent_mounts = mounts(agent)
    assert agent_mounts["pods-dir"]["mountPropagation"] == "Bidirectional"
    assert agent_mounts["pods-dir"]["mountPath"] == volumes["pods-dir"]["hostPath"]["path"] == "/var/lib/kubelet/pods"
    plugin_host_dir = volumes["csi-plugin-dir"]["hostPath"]["path"]
    assert plugin_host_dir == f"/var/lib/kubelet/plugins/{DRIVER_NAME}"
    socket_name = os.path.relpath(agent_socket, agent_mounts["csi-plugin-dir"]["mountPath"])
    registrar, probe = containers["node-driver-registrar"], containers["liveness-probe"]
    for sidecar in (registrar, probe):
        sidecar_dir = mounts(sidecar)["csi-plugin-dir"]["mountPath"]
        assert f"--csi-address={os.path.join(sidecar_dir, socket_name)}" in sidecar["args"]
    assert f"--kubelet-registration-path={plugin_host_dir}/{socket_name}" in registrar["args"]
    assert volumes["registration-dir"]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"
    assert mounts(registrar)["registration-dir"]["mountPath"] == "/registration"
    # The livenessprobe sidecar listens on the node's loopback only, not on the agent's health port (both on
    # the host network), and the agent's liveness probe asks it.
    assert "--http-endpoint=127.0.0.1:9808" in probe["args"] and not env["VAULTTMPFS_HEALTH_ADDR"].endswith(":9808")
    assert agent["livenessProbe"]["httpGet"] == {"host": "127.0.0.1", "port": 9808, "path": "/healthz"}


def test_csi_example_pod_validates_and_its_volume_publishes(node, kubelet, bao):
    from vaulttmpfs.csi import DRIVER_NAME

    [example] = documents(REPO / "installer" / "examples" / "csi" / "pod.yaml")
    validate(example)
    [volume] = example["spec"]["volumes"]
    assert volume["csi"]["driver"] == DRIVER_NAME
    pod = new_pod(example["metadata"]["name"], example["metadata"]["namespace"])
    fs_group = example["spec"]["securityContext"]["fsGroup"]
    path = kubelet.publish(pod, volume["csi"]["volumeAttributes"], volume=volume["name"], fs_group=fs_group,
                           read_only=volume["csi"]["readOnly"])
    info = (path / "vault-token").stat()
    assert info.st_gid == fs_group and stat.S_IMODE(info.st_mode) == 0o440  # readable by runAsUser 101
    assert sorted(unwrap(bao, path)["policies"]) == ["default", "nginx"]
    kubelet.teardown(pod, volume["name"])


def test_generated_stubs_match_the_runtime_and_the_spec_numbers():
    """csi_pb2 is generated at build time: it must load on this protobuf runtime without a version
    warning, and keep the CSI spec's (csi.v1, container-storage-interface/spec csi.proto) numbers."""
    out = subprocess.run([sys.executable, "-W", "error", "-c", "import vaulttmpfs.csi.csi_pb2_grpc"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    fields = lambda message: {f.name: f.number for f in message.DESCRIPTOR.fields}  # noqa: E731
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert fields(csi_pb2.NodePublishVolumeRequest) == {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4, "volume_capability": 5,
        "readonly": 6, "secrets": 7, "volume_context": 8}
    assert fields(csi_pb2.NodeUnpublishVolumeRequest) == {"volume_id": 1, "target_path": 2}
    assert fields(csi_pb2.VolumeCapability.MountVolume) == {"fs_type": 1, "mount_flags": 2, "volume_mount_group": 3}
    assert fields(csi_pb2.VolumeCapability) == {"block": 1, "mount": 2, "access_mode": 3}
    assert fields(csi_pb2.GetPluginInfoResponse) == {"name": 1, "vendor_version": 2, "manifest": 3}
    assert fields(csi_pb2.GetPluginCapabilitiesResponse) == {"capabilities": 1}
    assert fields(csi_pb2.NodeGetInfoResponse) == {"node_id": 1, "max_volumes_per_node": 2}
    assert csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP == 6
    assert csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER == 1
    services = {s.name: [m.name for m in s.methods] for s in csi_pb2.DESCRIPTOR.services_by_name.values()}
    assert services["Node"] == ["NodePublishVolume", "NodeUnpublishVolume", "NodeGetCapabilities", "NodeGetInfo"]
