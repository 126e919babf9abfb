"""A kubelet stand-in for CSI: calls the node plugin over its unix socket exactly as the kubelet's
pkg/volume/csi does for an inline ephemeral volume (csi_mounter.go SetUpAt/TearDownAt, csi_client.go):

- volume_id = "csi-" + hex(sha256(pod uid + volume name))            (csi_mounter.go makeVolumeHandle)
- target_path = <pods>/<uid>/volumes/kubernetes.io~csi/<volume>/mount; the kubelet makes the PARENT
  (0750) and writes vol_data.json there, the plugin makes target_path itself
- volume_context = the pod's volumeAttributes, then mergeMap'd OVER by the kubelet's keys
  (podInfoOnMount: csi.storage.k8s.io/pod.{name,namespace,uid}, serviceAccount.name, ephemeral=true;
  tokenRequests: csi.storage.k8s.io/serviceAccount.tokens, which serviceAccountTokenInSecrets moves
  into `secrets` instead)
- volume_capability = mount{fs_type, volume_mount_group = fsGroup when the plugin has
  VOLUME_MOUNT_GROUP}, access mode SINGLE_NODE_WRITER (inline volumes are ReadWriteOnce); readonly
- teardown: NodeUnpublishVolume(volume_id, target_path), then the kubelet removes the mount dir if
  the plugin left it, vol_data.json and the parent dir.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import grpc

from vaulttmpfs.csi import csi_pb2, csi_pb2_grpc

from .kubelet import Kubelet, Pod

DRIVER = "vaulttmpfs.cloudwatt.com"
CSI_PLUGIN_DIR = "kubernetes.io~csi"


new_pod = Kubelet.new_pod  # the same pods as the FlexVolume harness's


def volume_handle(pod: Pod, volume: str) -> str:
    return "csi-" + hashlib.sha256(f"{pod.uid}{volume}".encode()).hexdigest()


def pod_info(pod: Pod) -> dict[str, str]:
    """getPodInfoAttrs for an ephemeral volume."""
    return {
        "csi.storage.k8s.io/pod.name": pod.name,
        "csi.storage.k8s.io/pod.namespace": pod.namespace,
        "csi.storage.k8s.io/pod.uid": pod.uid,
        "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
        "csi.storage.k8s.io/ephemeral": "true",
    }


class CsiKubelet:
    def __init__(self, socket_path: str, pods_dir: Path, node_name: str = "node-1"):
        self.pods_dir = pods_dir
        self.node_name = node_name
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def target_path(self, pod: Pod, volume: str = "vault") -> Path:
        return self.pods_dir / pod.uid / "volumes" / CSI_PLUGIN_DIR / volume / "mount"

    def supports_mount_group(self) -> bool:
        caps = self.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=10).capabilities
        return any(c.rpc.type == csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP for c in caps)

    def publish_request(self, pod: Pod, attributes: dict[str, str], volume: str = "vault",
                        fs_group: int | None = None, read_only: bool = False, tokens: dict | None = None,
                        pod_info_on_mount: bool = True, tokens_in_secrets: bool = False,
                        ) -> csi_pb2.NodePublishVolumeRequest:
        """SetUpAt up to the RPC: the parent dir 0750, vol_data.json, the merged volume context.
        tokens_in_secrets: the CSIDriver's serviceAccountTokenInSecrets (csi_mounter.go: the tokens go
        in the request's `secrets` instead of the volume context)."""
        target = self.target_path(pod, volume)
        target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        handle = volume_handle(pod, volume)
        (target.parent / "vol_data.json").write_text(json.dumps({
            "specVolID": volume, "volumeHandle": handle, "driverName": DRIVER, "nodeName": self.node_name,
            "volumeLifecycleMode": "Ephemeral",
            "attachmentID": hashlib.sha256(f"{handle}{DRIVER}{self.node_name}".encode()).hexdigest()}))
        context = dict(attributes)
        if pod_info_on_mount:
            context.update(pod_info(pod))  # mergeMap: the kubelet's keys win over the pod's
        secrets = {}
        if tokens is not None:
            (secrets if tokens_in_secrets else context)["csi.storage.k8s.io/serviceAccount.tokens"] = json.dumps(tokens)
        mount = csi_pb2.VolumeCapability.MountVolume()
        if fs_group is not None:
            mount.volume_mount_group = str(fs_group)
        capability = csi_pb2.VolumeCapability(
            mount=mount,
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        return csi_pb2.NodePublishVolumeRequest(volume_id=handle, target_path=str(target),
                                                volume_capability=capability, readonly=read_only,
                                                volume_context=context, secrets=secrets)

    def publish(self, pod: Pod, attributes: dict[str, str], timeout: float = 120.0, **kwargs) -> Path:
        """NodePublishVolume as the kubelet sends it; raises grpc.RpcError on a non-OK status (after
        removing the mount dir, as the kubelet does on a final error)."""
        request = self.publish_request(pod, attributes, **kwargs)
        try:
            self.node.NodePublishVolume(request, timeout=timeout)
        except grpc.RpcError:
            target = Path(request.target_path)
            if target.is_dir() and not os.path.ismount(target):
                os.rmdir(target)
            raise
        return Path(request.target_path)

    def unpublish(self, pod: Pod, volume: str = "vault", timeout: float = 120.0) -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_handle(pod, volume), target_path=str(self.target_path(pod, volume))), timeout=timeout)

    def teardown(self, pod: Pod, volume: str = "vault") -> None:
        """TearDownAt: unpublish, then what the kubelet itself removes (mount dir if left, data file, parent)."""
        self.unpublish(pod, volume)
        target = self.target_path(pod, volume)
        if target.is_dir() and not os.path.ismount(target):
            os.rmdir(target)
        (target.parent / "vol_data.json").unlink(missing_ok=True)
        if target.parent.is_dir():
            os.rmdir(target.parent)
