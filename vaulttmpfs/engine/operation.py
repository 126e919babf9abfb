"""The verbs: mount and unmount a pod's token volume. Orchestration only.

The kubelet's wire format lives in `protocol`, disk work in `volume`/`state`, Vault in `vault`;
the engine takes them as collaborators (interfaces.py), so tests can hand in fakes.
Order in mount is chosen so a failure at any step undoes the steps before it:
admission (path, bindings; nothing to undo) -> token -> state record -> tmpfs -> files.
Each step pushes its undo on the call's one undo stack as it succeeds (`Engine.mount`); a failure
runs them newest first, under the volume's lock: the tmpfs (and its files) goes, then the token is
revoked or queued, and only then its record dropped. The tmpfs comes after the token because the
kubelet never calls mount again on a dir that is already a mount point: a driver killed while
Vault answers must leave none.
"""

from __future__ import annotations

import os
import time

from .. import jsonlite, log, telemetry
from ..errors import Conflict, DriverError, Forbidden, StateUnwritable, TokenNotWrapped, VaultDenied
from ..value import Value
from . import generator, volume
from .layout import FLEXVOLUME, Layout
from .record import (
    FROM_METADATA,
    GONE,
    NOTHING,
    QUEUED,
    REVOKED,
    MadeWith,
    Minted,
    Revocation,
    VolumeRecord,
    token_identity,
)
from .state import StateStore, sha256_hex
from .volume import MOUNT_SOURCE

# Annotations only (they are strings here): a brokered exec loads neither typing (~2.5 ms), the Protocol
# classes, nor config's Config class body beyond what load() built. typing.TYPE_CHECKING without typing:
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from ..config import Config
    from .interfaces import Filesystem, Store, VaultFactory

    Prepare = Callable[[], Callable[[], object] | None]  # a front end's step under the lock, returning its undo

PLUGIN_DIR = FLEXVOLUME.plugin_dir  # <pods dir>/<pod uid>/volumes/<this>/<volume name>
GENERATOR_CHECK_SECONDS = 3600  # how long "the generator token is not root" is trusted
_generator_checks: dict[str, dict[str, Any]] = {}  # token hash -> that check, in this process


class PodLogin(Value):
    """The pod logs itself in to Vault with its own service-account JWT (CSI tokenRequests)."""

    _hidden = ("jwt",)  # never in a repr
    mount: str  # the Vault auth mount (jwt or kubernetes method), e.g. "jwt"
    jwt: str


class MountRequest(Value):
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

    def token_identity(self, node: str) -> tuple[dict[str, str], str]:
        """The token's metadata and display name (record.token_identity: a rotation builds them the same)."""
        return token_identity(node, self.pod_namespace, self.pod_name, self.pod_uid, self.service_account,
                              self.volume_name)


def _hvac_vault(config: Config, token: str | None):
    """The default VaultFactory: vault.client.Vault (hvac), imported only by a call that talks to Vault
    itself (standalone, the agent): a brokered exec never loads it."""
    from ..vault.client import Vault

    return Vault(config, token)


def mount(config: Config, request: MountRequest, prepare: Prepare | None = None) -> str:
    return Engine(config).mount(request, prepare)


def unmount(config: Config, mount_dir: str, finish: Callable[[], object] | None = None) -> str:
    return Engine(config).unmount(mount_dir, finish)


def retry_pending(config: Config) -> dict[str, int]:
    """Retry queued revocations (the node agent calls this on a schedule)."""
    return Engine(config).retry_pending()


def revoke_or_queue(config: Config, store: Store, record: VolumeRecord, logger, why: str) -> Revocation:
    """For the reconciler (engine.reconcile): the same revocation unmount does, queue included."""
    return Engine(config, store=store).revoke_or_queue(record, logger, why)


def is_our_mount(mount_dir: str) -> bool:
    return _ours(volume.mount_info(volume.resolve(mount_dir)))


def _ours(info: dict[str, str] | None) -> bool:
    return bool(info and info["fstype"] == "tmpfs" and info["source"] == MOUNT_SOURCE)


class UndoStack:
    """contextlib.ExitStack's push/enter_context/__exit__, which is all a mount needs of it: contextlib
    loads collections and functools (~2.4 ms of a brokered mount, python -X importtime; see
    docs/performance-flexvolume.md). As ExitStack: callbacks run newest first, each with the exception
    in flight (one a callback raised replaces it, the others still run), a true return suppresses it."""

    def __init__(self) -> None:
        self._exits: list[Callable[..., object]] = []

    def push(self, exit: object) -> None:
        """A context manager's __exit__ (an object that has one), or a callable taking its arguments."""
        method = getattr(type(exit), "__exit__", None)
        self._exits.append(exit if method is None else method.__get__(exit))

    def enter_context(self, manager: Any) -> Any:
        entered = type(manager).__enter__(manager)
        self._exits.append(type(manager).__exit__.__get__(manager))
        return entered

    def __enter__(self) -> UndoStack:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        received, suppressed, raised = exc is not None, False, None
        while self._exits:
            try:
                if self._exits.pop()(exc_type, exc, tb):
                    suppressed, raised, exc_type, exc, tb = True, None, None, None, None
            except BaseException as new:  # noqa: BLE001 -- re-raised below, once every undo has run
                if exc is not None and new is not exc:
                    _chain(new, exc)
                raised, exc_type, exc, tb = new, type(new), new, new.__traceback__
        if raised is not None:
            raise raised
        return received and suppressed


def _chain(new: BaseException, old: BaseException) -> None:
    """ExitStack's context fix: `old` (what was being undone) becomes the context at the end of `new`'s chain."""
    seen, last = set(), new
    while last.__context__ is not None and last.__context__ is not old and id(last.__context__) not in seen:
        seen.add(id(last))
        last = last.__context__
    if last is not old:
        last.__context__ = old


def _on_failure(undo: UndoStack, step_undo: Callable[..., object], *args: Any) -> None:
    """Push the undo of a step just done: it runs only if the operation fails (an exception leaves
    the stack), as csi-lib's `defer func() { if !success {...} }`. The lock entered on the same stack
    before the steps is released after their undo, and at the end of a call that succeeded."""
    def undo_if_failed(exc_type, _exc, _tb) -> bool:
        if exc_type is not None:
            step_undo(*args)
        return False

    undo.push(undo_if_failed)


class Engine:
    """The volume operation over its collaborators (csi-lib's NodeServer over storage.Interface and
    mount.Interface): the state store, a Vault client for a token, the filesystem. One per call."""

    def __init__(self, config: Config, store: Store | None = None, vault: VaultFactory | None = None,
                 fs: Filesystem | None = None):
        self.config = config
        self.fs: Filesystem = fs or volume  # type: ignore[assignment] -- the module is the real one
        self.vault: VaultFactory = vault or _hvac_vault
        self._real: dict[str, str] = {}
        self.store: Store = store or StateStore(config.state_dir, resolve=self.real)

    def real(self, path: str) -> str:
        """`path` resolved, once per call: the store's key, admission and mountinfo all use it."""
        found = self._real.get(path)
        if found is None:
            found = self._real[path] = self.fs.resolve(path)
        return found

    def mount(self, request: MountRequest, prepare: Prepare | None = None) -> str:
        """prepare: the front end's own step (CSI: make the target dir), run under the volume's lock once
        admission passed; it returns its undo (or None), run on failure before the lock is released. Under
        the lock, so an unmount of the same volume cannot remove the dir between its check and the mount."""
        config, fs = self.config, self.fs
        with UndoStack() as undo:  # the call's one undo stack: see the module docstring
            if prepare is None:
                fs.check_target(request.mount_dir)  # the kubelet made it (FlexVolume): its faults named first
            logger = log.get(verb="mount", dir=request.mount_dir)
            request = self._admit(request, logger)
            logger = logger.bind(pod_uid=request.pod_uid)
            undo.enter_context(self.store.locked(request.mount_dir))  # released after the undo below
            if prepare is not None:
                undo_prepared = prepare()
                if undo_prepared is not None:
                    _on_failure(undo, undo_prepared)  # runs last of the undos, still under the lock
            fs.check_target(request.mount_dir)  # again under the lock: what is mounted on is what was checked
            if self._already_mounted(request, logger):
                return "already mounted"
            token = generator.read_token(config.generator_token_path)
            log.secret(token)
            self._refuse_root_generator(token)
            from . import intents  # a mount's only: an unmount loads it for nothing (~0.14 ms, -X importtime)

            # Noted before the create goes out (durable before the call answers): if its answer is lost,
            # the token it may have made is at least counted (engine.intents). Dropped once the record is on disk.
            intent = intents.Intent(self.store, request, config,
                                    None if request.login else self.vault(config, token), logger)
            undo.push(intent)
            minted = self._mint(request, token, logger)
            intent.minted = True
            log.secret(minted.secret)
            record = VolumeRecord(minted.accessor, minted.wrapping_accessor, request.mount_dir, request.role,
                                  policies=tuple(request.policies), pod_uid=request.pod_uid,
                                  namespace=request.pod_namespace, pod=request.pod_name,
                                  service_account=request.service_account, volume_name=request.volume_name,
                                  made_with=MadeWith(request.read_only, request.fs_group, request.unwrapped))
            _on_failure(undo, self._revoke_and_forget, record, logger, "mount failed after the token was created")
            written = self.store.write_volume(request.mount_dir, record)
            # Pushed before mount(2): a mount that took effect but did not return is undone too.
            _on_failure(undo, self._unmount_if_ours, request.mount_dir, request.real_dir)
            fs.mount_tmpfs(request.mount_dir, request.real_dir, config.tmpfs_size, request.fs_group)
            with fs.opened_mount(request.mount_dir, request.real_dir) as tmpfs:
                self._write_files(request, minted, tmpfs)
                if request.read_only:
                    fs.remount_readonly(tmpfs)
            intent.durable()
            written.wait()  # the record is on disk before the kubelet hears of the volume
            intent.done()
        logger.info("mounted", accessor=minted.accessor, policies=request.policies, role=request.role,
                    wrapped=not request.unwrapped)
        return f"token for policies {','.join(request.policies)} mounted"

    def _revoke_and_forget(self, record: VolumeRecord, logger, why: str) -> None:
        # In this order: killed in between, the record is still there to revoke from.
        self.revoke_or_queue(record, logger, why)
        self.store.forget_volume(record.mount_dir)

    def _unmount_if_ours(self, mount_dir: str, real_dir: str) -> None:
        try:
            if _ours(self.fs.mount_info(real_dir)):
                self.fs.unmount(mount_dir)
        except Exception:  # noqa: BLE001 -- the caller hears of the failure that made us undo
            pass

    def _already_mounted(self, request: MountRequest, logger) -> bool:
        """True for a complete volume made for this request; otherwise undo what an earlier mount left
        (killed, or lost in a reboot). A complete volume made otherwise (readOnly, fsGroup) is a Conflict."""
        mount_dir, fs = request.mount_dir, self.fs
        record = self._volume_record(mount_dir)
        if fs.is_mount_point(mount_dir):
            if not _ours(fs.mount_info(request.real_dir)):
                raise DriverError(
                    f"{mount_dir} is already a mount point that vaulttmpfs does not own; leaving it untouched"
                )
            if record and fs.holds_files(mount_dir, [self.config.token_filename]):
                _refuse_if_made_otherwise(record, request)
                logger.info("already mounted", accessor=record.accessor)
                return True
            fs.unmount(mount_dir)  # ours but half-made (the driver was killed mid-mount)
        if record:
            # A mount that died half-way, or a tmpfs lost with a reboot: its token is orphaned.
            self.revoke_or_queue(record, logger, why="stale volume record")
            self.store.forget_volume(mount_dir)
        return False

    def _volume_record(self, mount_dir: str) -> VolumeRecord | None:
        """What was minted for this volume: the state record, else the volume's own metadata file
        (the record may be lost or corrupt; the token it names must not be)."""
        record = self.store.read_volume(mount_dir)
        return record if record is not None else self._record_on_volume(mount_dir)

    def _record_on_volume(self, mount_dir: str) -> VolumeRecord | None:
        """The tokens the volume's own metadata file names (what the pod sees), if it is our tmpfs."""
        fs = self.fs
        if not fs.is_mount_point(mount_dir) or not _ours(fs.mount_info(self.real(mount_dir))):
            return None
        try:
            meta = jsonlite.loads(fs.read_small_file(os.path.join(mount_dir, self.config.token_filename + ".json"),
                                                 64 * 1024, follow=False))
        except (OSError, ValueError):
            return None
        return _record_from_metadata(meta, mount_dir) if isinstance(meta, dict) else None

    def _mint(self, request: MountRequest, token: str, logger) -> Minted:
        try:
            return self._create(request, token)
        except VaultDenied as exc:
            if request.login:
                raise
            if "permission denied" in str(exc).lower():
                if request.role != self.config.role_name:
                    # The pod asked for a role the generator's policy leaves out: the pod's to fix, not the node's.
                    raise Forbidden(f"{exc} -- the volume's `vault/role` {request.role!r} is not a role this node "
                                    f"may create tokens with (`auth/token/create/{request.role}`); leave `vault/role` "
                                    f"out for the node's role {self.config.role_name!r}, or ask the Vault admin to "
                                    "grant the generator's policy that role") from None
                raise _generator_refused(self.config, exc, f"`auth/token/create/{request.role}`") from None
            raise
        except TokenNotWrapped as exc:
            # A token the pod will not get is a token nobody would revoke: revoke it before answering.
            outcome = self.revoke_or_queue(VolumeRecord(exc.accessor, pod_uid=request.pod_uid), logger,
                                           why="Vault returned the token unwrapped")
            raise DriverError(f"{exc}; that token was not given to the pod: {outcome}") from None

    def _create(self, request: MountRequest, token: str) -> Minted:
        config = self.config
        volume = (request.real_dir, request.pod_uid)  # the broker's key: one mint per volume (interfaces.py)
        if request.login:  # the pod's own login, wrapped; the front end refuses it with vault/unwrap
            log.secret(request.login.jwt)
            return _wrapped(self.vault(config, None).login_jwt_wrapped(request.login.mount, request.role,
                                                                       request.login.jwt, volume=volume))
        args = (request.role, request.policies, *request.token_identity(config.node_name))
        if request.unwrapped:
            auth = self.vault(config, token).create_token(*args, volume=volume)
            # The metadata file never holds the token itself (the token file does).
            info = {**{k: v for k, v in auth.items() if k != "client_token"}, "unwrapped": True}
            return Minted(auth["client_token"], info, auth["accessor"], None)
        return _wrapped(self.vault(config, token).create_wrapped_token(*args, volume=volume))

    def _write_files(self, request: MountRequest, minted: Minted, tmpfs: str) -> None:
        config = self.config
        mode = 0o440 if request.fs_group is not None else 0o400
        name = config.token_filename
        files = {
            f"{name}.json": jsonlite.dumps(minted.info, indent=2).encode() + b"\n",
            name: minted.secret.encode(),  # last: its presence marks a complete volume
        }
        if config.cacert:
            try:
                files = {"ca.crt": self.fs.read_small_file(config.cacert), **files}
            except OSError as exc:
                raise DriverError(f"cannot read VAULT_CACERT {config.cacert}: {exc.strerror}") from None
        for filename, data in files.items():
            try:
                self.fs.write_file(tmpfs, filename, data, mode, request.fs_group)
            except OSError as exc:
                raise DriverError(f"cannot write {filename} ({len(data)} bytes) into {request.mount_dir}: "
                                  f"{exc.strerror}; is VAULTTMPFS_TMPFS_SIZE={config.tmpfs_size} too small?") from None

    def unmount(self, mount_dir: str, finish: Callable[[], object] | None = None) -> str:
        """finish: the front end's last step (CSI: remove the target dir), under the lock, so a mount
        waiting on it never finds its checked dir gone."""
        fs = self.fs
        logger = log.get(verb="unmount", dir=mount_dir)
        with self.store.locked(mount_dir):
            record = self._volume_record(mount_dir)
            outcome = self.revoke_or_queue(record, logger, why="unmount") if record else Revocation(NOTHING)
            if fs.is_mount_point(mount_dir):
                if not _ours(fs.mount_info(self.real(mount_dir))):
                    raise DriverError(f"{mount_dir} is a mount point vaulttmpfs does not own; leaving it untouched")
                try:
                    fs.unmount(mount_dir)
                except OSError as exc:
                    raise DriverError(str(exc)) from None
            self.store.forget_volume(mount_dir)
            if finish is not None:
                finish()
        logger.info("unmounted", revocation=str(outcome))
        return f"unmounted; {outcome}"

    def revoke_or_queue(self, record: VolumeRecord, logger, why: str, queued_at: float | None = None) -> Revocation:
        """Revoke the pod's tokens; what Vault cannot take now is queued for the agent to retry.
        queued_at: when a retried revocation was first queued (its latency counts from then)."""
        accessors = record.accessors()
        if not accessors:
            return Revocation(NOTHING)
        started = time.monotonic()
        try:
            token = generator.read_token(self.config.generator_token_path)
            log.secret(token)
            # One call for all of them: the broker makes them at once, in one round trip.
            answers = self.vault(self.config, token).revoke_accessors(accessors)
        except DriverError as exc:
            answers = [exc] * len(accessors)
        seconds = time.monotonic() - started
        failures, outcome = [], REVOKED
        for accessor, revoked in zip(accessors, answers, strict=True):
            if isinstance(revoked, DriverError):
                first = {"since": queued_at} if queued_at else {}  # a retry keeps when it was first queued
                try:
                    self.store.add_pending(accessor, {"why": why, "error": str(revoked), "pod_uid": record.pod_uid,
                                                      **first})
                except StateUnwritable as exc:
                    # Neither revoked nor queued: raised, so the caller keeps what names the token (the
                    # volume's record, the tmpfs) and the kubelet calls again.
                    raise type(exc)(f"token {accessor} could not be revoked ({revoked}) nor queued for a retry "
                                    f"({exc})", exc) from None
                logger.warning("revocation queued", accessor=accessor, error=str(revoked), why=why)
                failures.append(str(revoked))
                continue
            telemetry.revocation(time.time() - queued_at if queued_at else seconds)
            self.store.drop_pending(accessor)
            logger.info("token revoked" if revoked else "token already gone", accessor=accessor, why=why)
            if accessor == accessors[0] and not revoked:
                outcome = GONE
        if failures:
            return Revocation(QUEUED, accessors[0], failures[0])
        return Revocation(outcome, accessors[0])

    def retry_pending(self) -> dict[str, int]:
        """Revoke what the queue owes. A rotation's tokens are weighed against their volume's record first
        (rotate.volumes_of, _retry_rotated): a rotation killed half-way must not revoke the pod's token."""
        logger = log.get(verb="retry-revocations")
        counts = {"revoked": 0, "pending": 0, "waiting": 0}
        from . import rotate  # the agent's retries only: not a kubelet call's

        queue = self.store.list_pending()
        volumes = rotate.volumes_of(queue, self.store.list_volumes)
        for pending in queue:
            if pending["accessor"] not in volumes:
                self._retry(pending, rotate.due(pending, self._token_gone), logger, counts)
        for mount_dir in sorted(set(volumes.values())):
            self._retry_rotated(mount_dir, sorted(a for a, held_by in volumes.items() if held_by == mount_dir),
                                logger, counts)
        # pending counts the waiting ones too: still owed (uninstall must not drop them).
        return counts

    def _retry_rotated(self, mount_dir: str, accessors: list[str], logger, counts: dict[str, int]) -> None:
        """A rotation's queued tokens of one volume. Under its lock no rotation of it is under way: what
        its record names now is the pod's, and leaves the queue; the rest is owed (rotate.owed)."""
        from . import rotate

        with self.store.locked(mount_dir):
            record = rotate.settle(self, mount_dir, logger)
            for accessor in accessors:
                pending = self.store.read_pending(accessor)  # as it is now, not as listed before the lock
                if pending is None:
                    continue
                if record is not None and accessor in record.accessors():
                    self.store.drop_pending(accessor)
                    logger.info("kept: the volume's record names this token", accessor=accessor,
                                why=pending.get("why"), dir=mount_dir)
                    continue
                self._retry(pending, rotate.owed(pending, record, self._token_gone), logger, counts)

    def _retry(self, pending: dict[str, Any], due: bool, logger, counts: dict[str, int]) -> None:
        if not due:  # an old token a rotation keeps for a while
            counts["pending"] += 1
            counts["waiting"] += 1
            return
        record = VolumeRecord(pending["accessor"], pod_uid=str(pending.get("pod_uid") or ""))
        since = pending.get("since")
        queued = self.revoke_or_queue(record, logger, why=pending.get("why", "retry"),
                                      queued_at=since if isinstance(since, (int, float)) else None).queued
        counts["pending" if queued else "revoked"] += 1

    def _token_gone(self, accessor: str) -> bool:
        """Vault no longer has the token (for rotate.due); False when Vault cannot say now."""
        try:
            token = generator.read_token(self.config.generator_token_path)
            log.secret(token)
            return self.vault(self.config, token).lookup_accessor(accessor) is None
        except DriverError:
            return False

    def _admit(self, request: MountRequest, logger) -> MountRequest:
        """Who is asking, and may they? Decided before anything is read, mounted or minted."""
        config, real_dir = self.config, self.real(request.mount_dir)
        pod_uid, volume_name = request.layout.parts(request.mount_dir, config.pods_dir, real_dir)
        # The uid in the kubelet's path cannot be chosen by the pod; the pod's options can override any key.
        if request.pod_uid and request.pod_uid != pod_uid:
            raise Forbidden(f"the pod uid {request.pod_uid!r} given with the call does not match the pod uid "
                            f"{pod_uid!r} in the mount dir: refusing a spoofed identity")
        if request.login:
            logger.info("the pod logs in with its service-account token: Vault's role decides its policies",
                        auth_mount=request.login.mount, role=request.role)
        elif not self.check_bindings(request.pod_namespace, request.service_account, request.policies, logger):
            logger.warning("no VAULTTMPFS_POLICY_BINDINGS: any pod may ask for any policy the token role allows")
        # The path's volume name when the call did not give one: the token's metadata and the record name it.
        return request.replace(pod_uid=pod_uid, real_dir=real_dir, volume_name=request.volume_name or volume_name)

    def request_of(self, record: VolumeRecord, mount_dir: str) -> MountRequest:
        """The mount request a volume's record stands for: a rotation notes its mint (engine.intents) as a
        mount's create is. Here, not in rotate: operation imports rotate (its retry), not the reverse."""
        return MountRequest(mount_dir=mount_dir, policies=list(record.policies), role=record.role,
                            pod_namespace=record.namespace, pod_name=record.pod, pod_uid=record.pod_uid,
                            service_account=record.service_account, volume_name=record.volume_name)

    def check_bindings(self, namespace: str, service_account: str | None, policies: list[str], logger) -> bool:
        """May this pod have these policies, by the policy bindings in force now? A mount's admission asks
        this, and a rotation before it mints. False: no bindings (any policy the role allows); refused:
        Forbidden (or DriverError) naming the binding. service_account None: not known (a volume record an
        older version wrote): only what no service account changes counts, bindings covering every service
        account (`*`) and their policy patterns that do not name it; refused if the bindings need it."""
        if not self.config.policy_bindings:
            return False
        from . import bindings

        found = bindings.load(self.config.policy_bindings)
        if service_account is None:
            rule = bindings.check_without_service_account(found, namespace, policies)
        else:
            rule = bindings.check(found, namespace, service_account, policies)
        logger.info("policy binding allows it", rule=rule, namespace=namespace, service_account=service_account)
        return True

    def _refuse_root_generator(self, token: str) -> None:
        """A root generator token could mint anything and revoke everything: refuse to use it.

        Checking costs a lookup-self round trip, so its answer is kept in the state dir for
        GENERATOR_CHECK_SECONDS, keyed by a hash of the token (a token's policies never change;
        a new token in the file is checked at once). The mount hot path stays one Vault call.
        """
        config, store = self.config, self.store
        key = sha256_hex(token.encode())
        known = _generator_checks.get(key)  # the agent's calls skip the state dir read too
        if not _checked_lately(known, key):
            known = store.read_note("generator-check")
        if not _checked_lately(known, key):
            try:
                policies = self.vault(config, token).lookup_self().get("policies") or []
            except VaultDenied as exc:
                raise _generator_refused(config, exc, "`auth/token/lookup-self` (read), which vaulttmpfs needs to "
                                                      "check it is not a root token") from None
            known = {"key": key, "at": time.time(), "policies": sorted(policies)}
            store.write_note("generator-check", known)
        _generator_checks[key] = known
        if "root" in known["policies"]:
            raise DriverError(
                f"the generator token in {config.generator_token_path} carries the root policy: vaulttmpfs refuses "
                "to mint pod tokens with it (a copy of that file would own all of Vault); run `vaulttmpfs bootstrap` "
                "for a token with the token_generator policy only"
            )


def _wrapped(wrap_info: dict[str, Any]) -> Minted:
    return Minted(wrap_info["token"], wrap_info, wrap_info["wrapped_accessor"], wrap_info.get("accessor"))


def _refuse_if_made_otherwise(record: VolumeRecord, request: MountRequest) -> None:
    """A republish must ask for the volume the pod has: its token was minted for that role, those
    policies and wrapping, mounted so (readOnly, fsGroup). Anything else is a Conflict, never an OK
    that leaves the pod with a token other than the one asked for."""
    from .attributes import POLICIES, ROLE, UNWRAP  # a republish's only: an unmount never loads attributes

    asked = {"readOnly": request.read_only, "fsGroup": request.fs_group, ROLE: request.role,
             POLICIES: ",".join(sorted(request.policies)), UNWRAP: request.unwrapped}
    # What a record does not say (written before it was kept, or rebuilt from the volume) is taken as asked.
    made = dict(asked)
    if record.made_with:
        made.update(readOnly=record.made_with.read_only, fsGroup=record.made_with.fs_group)
        if record.made_with.unwrapped is not None:
            made[UNWRAP] = record.made_with.unwrapped
    if record.role:  # every record the state dir holds names its role and policies; a rebuilt one neither
        made.update({ROLE: record.role, POLICIES: ",".join(sorted(record.policies))})
    if made != asked:
        # readOnly and fsGroup always (the mount's own options), the token's attributes when they differ.
        shown = [name for name in asked if name in ("readOnly", "fsGroup") or made[name] != asked[name]]
        raise Conflict(f"{request.mount_dir} is already published with {_describe(made, shown)}; this call asks "
                       f"for {_describe(asked, shown)}: unpublish it first (the volume and its token are left as "
                       "they are)")


def _describe(options: dict[str, Any], names: list[str]) -> str:
    def text(value: Any) -> str:
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return ", ".join(f"{name}={text(options[name])}" for name in names)


def _record_from_metadata(meta: dict[str, Any], mount_dir: str) -> VolumeRecord | None:
    # Wrapped: wrap_info (wrapped_accessor: the pod token; accessor: the wrapping token). Unwrapped: auth.
    pod, wrapping = (meta.get("accessor"), None) if meta.get("unwrapped") else (meta.get("wrapped_accessor"),
                                                                                  meta.get("accessor"))
    if not isinstance(pod, str) or not pod:
        return None
    return VolumeRecord(pod, wrapping if isinstance(wrapping, str) else None, mount_dir=mount_dir,
                        source=FROM_METADATA)


def _checked_lately(known: dict[str, Any] | None, key: str) -> bool:
    return bool(known) and known.get("key") == key and 0 <= time.time() - known.get("at", 0) < GENERATOR_CHECK_SECONDS


def _generator_refused(config: Config, exc: Exception, needs: str) -> DriverError:
    return DriverError(
        f"{exc} -- the generator token in {config.generator_token_path} may be expired or revoked, or its "
        f"policy may not allow {needs}; check it with `vaulttmpfs renew-generator` and re-run "
        "`vaulttmpfs bootstrap` if needed"
    )
