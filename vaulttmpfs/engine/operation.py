"""The verbs: mount and unmount a pod's token volume. Orchestration only.

The kubelet's wire format lives in `protocol`, disk work in `volume`/`state`, Vault in `vault`.
Order in mount is chosen so a failure at any step undoes the steps before it:
admission (path, bindings; nothing to undo) -> token (revoked on failure) -> state record ->
tmpfs -> files. The tmpfs comes after the token because the kubelet never calls mount again on
a dir that is already a mount point: a driver killed while Vault answers must leave none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .. import log
from . import generator, volume
from ..config import Config
from ..errors import Conflict, DriverError, Forbidden, VaultDenied
from .layout import FLEXVOLUME, Layout
from .state import StateStore

MOUNT_SOURCE = "vaulttmpfs"  # the tmpfs "device" name: how we recognise our own mounts
PLUGIN_DIR = FLEXVOLUME.plugin_dir  # <pods dir>/<pod uid>/volumes/<this>/<volume name>
GENERATOR_CHECK_SECONDS = 3600  # how long "the generator token is not root" is trusted
_generator_checks: dict[str, dict[str, Any]] = {}  # token hash -> that check, in this process


@dataclass(frozen=True)
class PodLogin:
    """The pod logs itself in to Vault with its own service-account JWT (CSI tokenRequests)."""

    mount: str  # the Vault auth mount (jwt or kubernetes method), e.g. "jwt"
    jwt: str = field(repr=False)


@dataclass(frozen=True)
class MountRequest:
    mount_dir: str
    policies: list[str]
    role: str
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    service_account: str = ""
    volume_name: str = ""
    fs_group: int | None = None
    read_only: bool = False
    unwrapped: bool = False  # vault/unwrap: the plain token in the volume, for apps that cannot unwrap
    layout: Layout = FLEXVOLUME  # which kubelet path layout the mount dir follows (per front end)
    login: PodLogin | None = None  # set: log in as the pod (Vault's role decides) instead of minting
    real_dir: str = ""  # the mount dir's resolved path, as admission approved it (set by admission)

    def token_metadata(self, node: str) -> dict[str, str]:
        meta = {
            "created_by": "vaulttmpfs",
            "namespace": self.pod_namespace,
            "pod": self.pod_name,
            "pod_uid": self.pod_uid,
            "service_account": self.service_account,
            "volume": self.volume_name,
            "node": node,
        }
        return {k: v for k, v in meta.items() if v}

    def display_name(self) -> str:
        who = "-".join(p for p in (self.pod_namespace, self.pod_name) if p) or "pod"
        return f"vaulttmpfs-{who}"[:100]


def is_our_mount(mount_dir: str) -> bool:
    info = volume.mount_info(mount_dir)
    return bool(info and info["fstype"] == "tmpfs" and info["source"] == MOUNT_SOURCE)


def mount(config: Config, request: MountRequest) -> str:
    volume.check_target(request.mount_dir)
    store = StateStore(config.state_dir)
    logger = log.get(config.log_file, verb="mount", dir=request.mount_dir)
    request = _admit(config, request, logger)
    logger = logger.bind(pod_uid=request.pod_uid)
    mount_dir = request.mount_dir
    with store.locked(mount_dir):
        if _already_mounted(config, store, request, logger):
            return "already mounted"
        token = generator.read_token(config.generator_token_path)
        log.secret(token)
        _refuse_root_generator(config, store, token)
        try:
            accessor = _mint_and_write(config, store, request, token, logger)
        except BaseException:
            if is_our_mount(mount_dir):
                with contextlib.suppress(Exception):
                    volume.unmount(mount_dir)
            raise
    logger.info("mounted", accessor=accessor, policies=request.policies, role=request.role,
                wrapped=not request.unwrapped)
    return f"token for policies {','.join(request.policies)} mounted"


def _already_mounted(config: Config, store: StateStore, request: MountRequest, logger) -> bool:
    """True for a complete volume made for this request; otherwise undo what an earlier mount left
    (killed, or lost in a reboot). A complete volume made otherwise (readOnly, fsGroup) is a Conflict."""
    mount_dir = request.mount_dir
    record = _volume_record(config, store, mount_dir)
    if volume.is_mount_point(mount_dir):
        if not is_our_mount(mount_dir):
            raise DriverError(
                f"{mount_dir} is already a mount point that vaulttmpfs does not own; leaving it untouched"
            )
        if record and volume.holds_files(mount_dir, [config.token_filename]):
            _refuse_if_made_otherwise(record, request)
            logger.info("already mounted", accessor=record.get("accessor"))
            return True
        volume.unmount(mount_dir)  # ours but half-made (the driver was killed mid-mount)
    if record:
        # A mount that died half-way, or a tmpfs lost with a reboot: its token is orphaned.
        _revoke_or_queue(config, store, record, logger, why="stale volume record")
        store.forget_volume(mount_dir)
    return False


def _refuse_if_made_otherwise(record: dict[str, Any], request: MountRequest) -> None:
    # Records written before these fields were kept say nothing: such a volume is taken as it is.
    made = {"readOnly": record.get("read_only", request.read_only),
            "fsGroup": record.get("fs_group", request.fs_group)}
    asked = {"readOnly": request.read_only, "fsGroup": request.fs_group}
    if made != asked:
        raise Conflict(f"{request.mount_dir} is already published with {_describe(made)}; this call asks for "
                       f"{_describe(asked)}: unpublish it first (the volume and its token are left as they are)")


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{name}={'none' if value is None else str(value).lower()}" for name, value in options.items())


def _volume_record(config: Config, store: StateStore, mount_dir: str) -> dict[str, Any] | None:
    """What was minted for this volume: the state record, else the volume's own metadata file
    (the record may be lost or corrupt; the token it names must not be)."""
    record = store.read_volume(mount_dir)
    if record or not volume.is_mount_point(mount_dir) or not is_our_mount(mount_dir):
        return record
    try:
        meta = json.loads(volume.read_small_file(os.path.join(mount_dir, config.token_filename + ".json"),
                                                 64 * 1024, follow=False))
    except (OSError, ValueError):
        return None
    return _record_from_metadata(meta) if isinstance(meta, dict) else None


def _record_from_metadata(meta: dict[str, Any]) -> dict[str, Any] | None:
    # Wrapped: wrap_info (wrapped_accessor: the pod token; accessor: the wrapping token). Unwrapped: auth.
    pod, wrapping = (meta.get("accessor"), None) if meta.get("unwrapped") else (meta.get("wrapped_accessor"),
                                                                                  meta.get("accessor"))
    if not isinstance(pod, str) or not pod:
        return None
    return {"accessor": pod, "wrapping_accessor": wrapping if isinstance(wrapping, str) else None,
            "source": "volume metadata"}


def _mint_and_write(config: Config, store: StateStore, request: MountRequest, token: str, logger) -> str:
    from ..vault.client import TokenNotWrapped

    try:
        secret, info, accessor, wrapping_accessor = _mint(config, request, token)
    except VaultDenied as exc:
        if request.login:
            raise
        if "permission denied" in str(exc).lower():
            raise _generator_refused(config, exc, f"`auth/token/create/{request.role}`") from None
        raise
    except TokenNotWrapped as exc:
        # A token the pod will not get is a token nobody would revoke: revoke it before answering.
        outcome = _revoke_or_queue(config, store, {"accessor": exc.accessor, "pod_uid": request.pod_uid}, logger,
                                   why="Vault returned the token unwrapped")
        raise DriverError(f"{exc}; that token was not given to the pod: {outcome}") from None
    log.secret(secret)
    record = {
        "accessor": accessor,
        "wrapping_accessor": wrapping_accessor,
        "role": request.role,
        "policies": request.policies,
        "pod_uid": request.pod_uid,
        "namespace": request.pod_namespace,
        "pod": request.pod_name,
        "read_only": request.read_only,
        "fs_group": request.fs_group,
    }
    try:
        written = store.write_volume(request.mount_dir, record)
        try:
            volume.mount_tmpfs(request.mount_dir, request.real_dir, config.tmpfs_size, request.fs_group)
            with volume.opened_mount(request.mount_dir, request.real_dir) as tmpfs:
                _write_files(config, request, secret, info, tmpfs)
                if request.read_only:
                    volume.remount_readonly(tmpfs)
        finally:
            written.wait()  # the record is on disk before the kubelet hears of the volume
    except BaseException:
        _revoke_or_queue(config, store, record, logger, why="mount failed after the token was created")
        store.forget_volume(request.mount_dir)
        raise
    return accessor


def _mint(config: Config, request: MountRequest, token: str) -> tuple[str, dict[str, Any], str, str | None]:
    """The volume's token, its metadata file's content, the pod token's accessor, the wrapping token's."""
    from ..vault.client import Vault

    if request.login:  # the pod's own login, wrapped; the front end refuses it with vault/unwrap
        log.secret(request.login.jwt)
        wrap_info = Vault(config, None).login_jwt_wrapped(request.login.mount, request.role, request.login.jwt)
        return wrap_info["token"], wrap_info, wrap_info["wrapped_accessor"], wrap_info.get("accessor")
    args = (request.role, request.policies, request.token_metadata(config.node_name), request.display_name())
    if request.unwrapped:
        auth = Vault(config, token).create_token(*args)
        # The metadata file never holds the token itself (the token file does).
        info = {**{k: v for k, v in auth.items() if k != "client_token"}, "unwrapped": True}
        return auth["client_token"], info, auth["accessor"], None
    wrap_info = Vault(config, token).create_wrapped_token(*args)
    return wrap_info["token"], wrap_info, wrap_info["wrapped_accessor"], wrap_info.get("accessor")


def _write_files(config: Config, request: MountRequest, secret: str, info: dict[str, Any], tmpfs: str) -> None:
    mode = 0o440 if request.fs_group is not None else 0o400
    name = config.token_filename
    files = {
        f"{name}.json": json.dumps(info, indent=2).encode() + b"\n",
        name: secret.encode(),  # last: its presence marks a complete volume
    }
    if config.cacert:
        try:
            files = {"ca.crt": volume.read_small_file(config.cacert), **files}
        except OSError as exc:
            raise DriverError(f"cannot read VAULT_CACERT {config.cacert}: {exc.strerror}") from None
    for filename, data in files.items():
        try:
            volume.write_file(tmpfs, filename, data, mode, request.fs_group)
        except OSError as exc:
            raise DriverError(f"cannot write {filename} ({len(data)} bytes) into {request.mount_dir}: "
                              f"{exc.strerror}; is VAULTTMPFS_TMPFS_SIZE={config.tmpfs_size} too small?") from None


def unmount(config: Config, mount_dir: str) -> str:
    store = StateStore(config.state_dir)
    logger = log.get(config.log_file, verb="unmount", dir=mount_dir)
    with store.locked(mount_dir):
        record = _volume_record(config, store, mount_dir)
        message = "nothing to revoke"
        if record:
            message = _revoke_or_queue(config, store, record, logger, why="unmount")
        if volume.is_mount_point(mount_dir):
            if not is_our_mount(mount_dir):
                raise DriverError(f"{mount_dir} is a mount point vaulttmpfs does not own; leaving it untouched")
            try:
                volume.unmount(mount_dir)
            except OSError as exc:
                raise DriverError(str(exc)) from None
        store.forget_volume(mount_dir)
    logger.info("unmounted", revocation=message)
    return f"unmounted; {message}"


def _accessors(record: dict[str, Any]) -> list[str]:
    # The pod token, then its wrapping token (alive until unwrapped or its TTL ends).
    return [a for a in (record.get("accessor"), record.get("wrapping_accessor")) if a]


def _revoke_or_queue(config: Config, store: StateStore, record: dict[str, Any], logger, why: str) -> str:
    """Revoke the pod's tokens; what Vault cannot take now is queued for the agent to retry."""
    from ..vault.client import Vault

    accessors = _accessors(record)
    if not accessors:
        return "nothing to revoke"
    client, failures, outcome = None, [], "revoked"
    for accessor in accessors:
        try:
            if client is None:
                token = generator.read_token(config.generator_token_path)
                log.secret(token)
                client = Vault(config, token)
            revoked = client.revoke_accessor(accessor)
        except DriverError as exc:
            store.add_pending(accessor, {"why": why, "error": str(exc), "pod_uid": record.get("pod_uid", "")})
            logger.warning("revocation queued", accessor=accessor, error=str(exc), why=why)
            failures.append(str(exc))
            continue
        store.drop_pending(accessor)
        logger.info("token revoked" if revoked else "token already gone", accessor=accessor, why=why)
        if accessor == accessors[0] and not revoked:
            outcome = "already gone"
    if failures:
        return f"could not revoke the pod token (accessor {accessors[0]}) now, queued for retry: {failures[0]}"
    return f"token {outcome} (accessor {accessors[0]})"


def retry_pending(config: Config) -> dict[str, int]:
    """Retry queued revocations (the node agent calls this on a schedule)."""
    store = StateStore(config.state_dir)
    logger = log.get(config.log_file, verb="retry-revocations")
    done = failed = 0
    for record in store.list_pending():
        message = _revoke_or_queue(config, store, {"accessor": record["accessor"], "pod_uid": record.get("pod_uid")},
                                   logger, why=record.get("why", "retry"))
        if message.startswith("could not"):
            failed += 1
        else:
            done += 1
    return {"revoked": done, "pending": failed}


def _admit(config: Config, request: MountRequest, logger) -> MountRequest:
    """Who is asking, and may they? Decided before anything is read, mounted or minted."""
    pod_uid, _volume = request.layout.parts(request.mount_dir, config.pods_dir)
    # The uid in the kubelet's path cannot be chosen by the pod; the pod's options can override any key.
    if request.pod_uid and request.pod_uid != pod_uid:
        raise Forbidden(f"the pod uid {request.pod_uid!r} given with the call does not match the pod uid "
                        f"{pod_uid!r} in the mount dir: refusing a spoofed identity")
    if request.login:
        logger.info("the pod logs in with its service-account token: Vault's role decides its policies",
                    auth_mount=request.login.mount, role=request.role)
    elif config.policy_bindings:
        from . import bindings

        rule = bindings.check(bindings.load(config.policy_bindings), request.pod_namespace,
                              request.service_account, request.policies)
        logger.info("policy binding allows it", rule=rule, namespace=request.pod_namespace,
                    service_account=request.service_account)
    else:
        logger.warning("no VAULTTMPFS_POLICY_BINDINGS: any pod may ask for any policy the token role allows")
    return replace(request, pod_uid=pod_uid, real_dir=volume.resolve(request.mount_dir))


def _refuse_root_generator(config: Config, store: StateStore, token: str) -> None:
    """A root generator token could mint anything and revoke everything: refuse to use it.

    Checking costs a lookup-self round trip, so its answer is kept in the state dir for
    GENERATOR_CHECK_SECONDS, keyed by a hash of the token (a token's policies never change;
    a new token in the file is checked at once). The mount hot path stays one Vault call.
    """
    from ..vault.client import Vault

    key = hashlib.sha256(token.encode()).hexdigest()
    known = _generator_checks.get(key)  # the agent's calls skip the state dir read too
    if not _checked_lately(known, key):
        known = store.read_note("generator-check")
    if not _checked_lately(known, key):
        try:
            policies = Vault(config, token).lookup_self().get("policies") or []
        except VaultDenied as exc:
            raise _generator_refused(
                config, exc, "`auth/token/lookup-self` (read), which vaulttmpfs needs to check it is not a root token"
            ) from None
        known = {"key": key, "at": time.time(), "policies": sorted(policies)}
        store.write_note("generator-check", known)
    _generator_checks[key] = known
    if "root" in known["policies"]:
        raise DriverError(
            f"the generator token in {config.generator_token_path} carries the root policy: vaulttmpfs refuses "
            "to mint pod tokens with it (a copy of that file would own all of Vault); run `vaulttmpfs bootstrap` "
            "for a token with the token_generator policy only"
        )


def _checked_lately(known: dict[str, Any] | None, key: str) -> bool:
    return bool(known) and known.get("key") == key and 0 <= time.time() - known.get("at", 0) < GENERATOR_CHECK_SECONDS


def _generator_refused(config: Config, exc: Exception, needs: str) -> DriverError:
    return DriverError(
        f"{exc} -- the generator token in {config.generator_token_path} may be expired or revoked, or its "
        f"policy may not allow {needs}; check it with `vaulttmpfs renew-generator` and re-run "
        "`vaulttmpfs bootstrap` if needed"
    )


def revoke_or_queue(config: Config, store: StateStore, record: dict[str, Any], logger, why: str) -> str:
    """For the reconciler (engine.reconcile): the same revocation unmount does, queue included."""
    return _revoke_or_queue(config, store, record, logger, why)
