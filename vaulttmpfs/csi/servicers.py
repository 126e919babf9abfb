"""CSI Identity, Node and (empty) Controller services: each RPC is a short translation between the
kubelet's request and the engine. Nothing here decides policy, mounts or talks to Vault.

Identity comes from the keys the kubelet merges OVER the pod's own volume attributes
(`csi.storage.k8s.io/*`, CSIDriver podInfoOnMount), so a pod cannot forge them; and the pod uid must
also match the one in the target path, which proves the kubelet (not the pod) supplied them.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import json
import os
from dataclasses import dataclass

from google.protobuf import wrappers_pb2

from .. import __version__, log
from ..config import Config
from ..engine import attributes, operation
from ..engine.layout import CSI
from ..engine.state import StateStore
from ..errors import BadRequest, DriverError, Forbidden
from . import DRIVER_NAME, csi_pb2, csi_pb2_grpc

KUBELET = "csi.storage.k8s.io/"
POD_NAME, POD_NAMESPACE, POD_UID = KUBELET + "pod.name", KUBELET + "pod.namespace", KUBELET + "pod.uid"
SERVICE_ACCOUNT, EPHEMERAL = KUBELET + "serviceAccount.name", KUBELET + "ephemeral"
SA_TOKENS = KUBELET + "serviceAccount.tokens"  # CSIDriver tokenRequests: {"<audience>": {"token": JWT, ...}}
TARGET_MODE = 0o750  # as the kubelet makes the parent; the tmpfs mounted over it sets its own mode
_MODE = csi_pb2.VolumeCapability.AccessMode
# One pod's tmpfs on one node: the single-node modes. The kubelet sends SINGLE_NODE_WRITER for an inline
# volume (ReadWriteOnce; SINGLE_NODE_MULTI_WRITER only to a plugin advertising that capability).
ACCESS_MODES = (_MODE.SINGLE_NODE_WRITER, _MODE.SINGLE_NODE_READER_ONLY, _MODE.SINGLE_NODE_SINGLE_WRITER,
                _MODE.SINGLE_NODE_MULTI_WRITER)


class Identity(csi_pb2_grpc.IdentityServicer):
    def GetPluginInfo(self, request, context):  # noqa: N802 -- the CSI spec's names
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    def GetPluginCapabilities(self, request, context):  # noqa: N802
        return csi_pb2.GetPluginCapabilitiesResponse()  # node-only: no controller service to call

    def Probe(self, request, context):  # noqa: N802
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))


class Controller(csi_pb2_grpc.ControllerServicer):
    """Nothing to provision or attach: answers so that generic CSI suites (csi-sanity) can run."""

    def ControllerGetCapabilities(self, request, context):  # noqa: N802
        return csi_pb2.ControllerGetCapabilitiesResponse()


@dataclass(frozen=True)
class JwtLogin:
    """Publish logs in as the pod with the kubelet's service-account token for `audience`."""

    mount: str  # Vault auth mount of the jwt/kubernetes method
    audience: str = "vault"


class Node(csi_pb2_grpc.NodeServicer):
    def __init__(self, config: Config, jwt_login: JwtLogin | None = None):
        self.config = config
        self.jwt_login = jwt_login

    def NodeGetCapabilities(self, request, context):  # noqa: N802
        # No STAGE_UNSTAGE_VOLUME: the kubelet publishes directly. VOLUME_MOUNT_GROUP: it hands us the
        # pod's fsGroup instead of chgrp-ing the files itself (which would leave them group-writable).
        rpc = csi_pb2.NodeServiceCapability.RPC
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=rpc(type=rpc.VOLUME_MOUNT_GROUP))])

    def NodeGetInfo(self, request, context):  # noqa: N802
        return csi_pb2.NodeGetInfoResponse(node_id=self.config.node_name)

    def NodePublishVolume(self, request, context):  # noqa: N802
        mount_request = publish_request(request, self.config, self.jwt_login)
        # Made under the volume's lock (an unpublish or a failed publish of it may be removing it right now),
        # and its removal joins the engine's undo: after the engine's own steps, before the lock goes.
        operation.mount(self.config, mount_request, prepare=functools.partial(_make_target, request.target_path))
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request, context):  # noqa: N802
        _kubelet_volume(request, self.config)  # only ever unmount/remove inside the layout, the volume named
        # The spec: the SP deletes what it created; under the lock, as a publish waiting on it makes it anew.
        operation.unmount(self.config, request.target_path,
                          finish=functools.partial(_remove_target, request.target_path, missing_ok=True))
        return csi_pb2.NodeUnpublishVolumeResponse()


class TeardownOnly(Node):
    """While `vaulttmpfs uninstall --wait` takes the node's install away: the kubelet can still unpublish
    (and republish) what is mounted, but no new volume is made: it would hold the uninstall up, with a
    token minted by a generator token about to be revoked."""

    def NodePublishVolume(self, request, context):  # noqa: N802
        if StateStore(self.config.state_dir).read_volume(request.target_path) is None:
            raise DriverError(f"vaulttmpfs is being uninstalled from node {self.config.node_name}: "
                              "no new volume is made here")
        return super().NodePublishVolume(request, context)


def publish_request(request, config: Config, jwt_login: JwtLogin | None = None) -> operation.MountRequest:
    """The engine's request from the kubelet's, or BadRequest naming the field or attribute."""
    pod_uid, volume_name = _kubelet_volume(request, config)
    context = dict(request.volume_context)
    if context.get(EPHEMERAL) != "true":
        raise BadRequest(f"attribute {EPHEMERAL!r} is not \"true\": vaulttmpfs serves ephemeral inline volumes "
                         "only; the CSIDriver needs podInfoOnMount: true and volumeLifecycleModes: [Ephemeral]")
    for key in (POD_UID, POD_NAMESPACE, POD_NAME, SERVICE_ACCOUNT):
        if not context.get(key):
            raise BadRequest(f"attribute {key!r} is missing: the CSIDriver {DRIVER_NAME} needs podInfoOnMount: true")
    attributes.require_known(context)
    login = None
    if jwt_login:
        if attributes.POLICIES in context:
            raise BadRequest(f"attribute {attributes.POLICIES!r} is not used: this node logs pods in with their "
                             f"service-account token at auth/{jwt_login.mount}, where the Vault role "
                             f"({attributes.ROLE!r}) decides the policies; remove it")
        if attributes.flag(context, attributes.UNWRAP):
            raise BadRequest(f"attribute {attributes.UNWRAP!r} is not supported when pods log in with their "
                             "service-account token: the login is always response-wrapped")
        jwt = _service_account_token(request, jwt_login.audience, pod_uid)
        login = operation.PodLogin(jwt_login.mount, jwt)
    return operation.MountRequest(
        mount_dir=request.target_path,
        policies=[] if login else attributes.policies(context.get(attributes.POLICIES)),
        role=attributes.role(context.get(attributes.ROLE), config.role_name),
        pod_namespace=context[POD_NAMESPACE],
        pod_name=context[POD_NAME],
        pod_uid=context[POD_UID],  # the engine refuses it unless it is the uid in the target path
        service_account=context[SERVICE_ACCOUNT],
        volume_name=volume_name,
        fs_group=_mount_group(request.volume_capability),
        read_only=request.readonly,
        unwrapped=attributes.flag(context, attributes.UNWRAP),
        layout=CSI,
        login=login,
    )


def _kubelet_volume(request, config: Config) -> tuple[str, str]:
    """(pod uid, volume name) of the target path, once the volume_id is the kubelet's handle for that
    volume (publish and unpublish alike: an unpublish naming one volume never touches another's)."""
    _required(request, "volume_id", "target_path")
    pod_uid, volume_name = CSI.parts(request.target_path, config.pods_dir)
    expected_id = "csi-" + hashlib.sha256((pod_uid + volume_name).encode()).hexdigest()  # makeVolumeHandle
    if request.volume_id != expected_id:
        raise BadRequest(f"volume_id {request.volume_id!r} is not the kubelet's handle for volume "
                         f"{volume_name!r} of pod {pod_uid} ({expected_id})")
    return pod_uid, volume_name


def _service_account_token(request, audience: str, pod_uid: str) -> str:
    """The pod's JWT for `audience`, from the secrets (serviceAccountTokenInSecrets) or the volume context.

    With serviceAccountTokenInSecrets the kubelet writes the key into `secrets` only: one in the volume
    context beside it is the pod's own attribute (nothing merged over it), refused rather than read."""
    text = request.secrets.get(SA_TOKENS)
    if text and SA_TOKENS in request.volume_context:
        raise BadRequest(f"attribute {SA_TOKENS!r} is the kubelet's (it passes it in the call's secrets): remove it "
                         "from the volume's volumeAttributes")
    text = text or request.volume_context.get(SA_TOKENS)
    if not text:
        raise BadRequest(f"attribute {SA_TOKENS!r} is missing: the CSIDriver {DRIVER_NAME} needs "
                         f"tokenRequests: [{{audience: {audience}}}] for pods to log in to Vault")
    try:
        entry = json.loads(text).get(audience) or {}
        jwt = entry.get("token") if isinstance(entry, dict) else None
    except (ValueError, AttributeError):
        raise BadRequest(f"attribute {SA_TOKENS!r} is not the kubelet's JSON object of tokens") from None
    if not isinstance(jwt, str) or not jwt:
        raise BadRequest(f"attribute {SA_TOKENS!r} has no token for audience {audience!r}: add it to the "
                         f"CSIDriver's tokenRequests")
    log.secret(jwt)
    # Vault checks the signature; this checks the token is this pod's (bound to its uid), not another's.
    bound = _unverified_claims(jwt)
    for claim in ("kubernetes.io", "pod", "uid"):  # absent: bound to no pod; of another type: no kubelet's token
        if bound is not None and not isinstance(bound, dict):
            raise BadRequest(f"attribute {SA_TOKENS!r} holds a token whose claims are not a service-account "
                             "token's (kubernetes.io.pod.uid)")
        bound = bound.get(claim) if bound is not None else None
    if bound != pod_uid:
        raise Forbidden(f"the service-account token for audience {audience!r} is bound to pod uid {bound!r}, "
                        f"not to this pod ({pod_uid}): refusing it")
    return jwt


def _unverified_claims(jwt: str) -> dict:
    try:
        payload = jwt.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        raise BadRequest(f"attribute {SA_TOKENS!r} holds a token that is not a JWT") from None


def _required(request, *fields: str) -> None:
    for field in fields:
        if not getattr(request, field):
            raise BadRequest(f"{field} is required")
    path = getattr(request, "target_path", "")
    if "\0" in path:  # no path can hold one (os calls raise ValueError)
        raise BadRequest(f"target_path {path!r} holds a NUL character")
    if not os.path.isabs(path):
        raise BadRequest(f"target_path {path!r} is not an absolute path")
    # The kubelet's paths never hold one: a `..` could reach another pod's volume (given its own id).
    if os.pardir in path.split(os.sep):
        raise BadRequest(f"target_path {path!r} has a '..' component; the kubelet's target paths never do")


def _mount_group(capability) -> int | None:
    if not capability.HasField("mount"):
        what = "a block volume" if capability.HasField("block") else "no access type"
        raise BadRequest(f"volume_capability asks for {what}; vaulttmpfs volumes are mounted file systems")
    mode = capability.access_mode.mode
    if mode not in ACCESS_MODES:
        name = _MODE.Mode.Name(mode) if mode in _MODE.Mode.values() else str(mode)  # a number newer than our spec
        raise BadRequest(f"access mode {name} is not supported: a vaulttmpfs volume is one pod's, on one node "
                         f"({', '.join(map(_MODE.Mode.Name, ACCESS_MODES))})")
    mount = capability.mount
    if mount.fs_type not in ("", "tmpfs"):
        raise BadRequest(f"fsType {mount.fs_type!r} is not supported: the volume is always a tmpfs")
    if mount.mount_flags:
        raise BadRequest(f"mount options {list(mount.mount_flags)!r} are not supported: the tmpfs is always "
                         "nosuid,nodev,noexec (and ro when the volume is readOnly)")
    group = mount.volume_mount_group
    if not group:
        return None
    if not attributes.is_group_id(group):
        raise BadRequest(f"volume_mount_group {group!r} is not a group id")
    return int(group)


def _make_target(path: str):
    """Create the target dir (the plugin's job per the spec); its undo if this call created it, else None."""
    try:
        os.mkdir(path, TARGET_MODE)
    except FileExistsError:
        return None
    except FileNotFoundError:
        raise BadRequest(f"the parent of target_path {path} does not exist (the kubelet creates it)") from None
    return functools.partial(_remove_target, path, missing_ok=True)


def _remove_target(path: str, missing_ok: bool) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ENOTEMPTY, errno.EBUSY):
            raise DriverError(f"cannot remove target_path {path}: {exc.strerror}; leaving it for the operator") \
                from None
        raise


