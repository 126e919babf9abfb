"""On-demand rotation (`vaulttmpfs rotate`): each chosen volume gets a freshly minted wrapped token,
its files replaced atomically; the old token is queued for revocation once the pod side took the new
one (the new wrapping token is gone before it could expire: unwrapped) or after a grace period.

Order, so that a kill -9 at any step leaves no token nobody would revoke or count:
note the mint (an intent, engine.intents) -> mint -> queue the NEW tokens (ROTATING) -> drop the note
-> queue the OLD tokens (ROTATED: due after the grace period, or once the pod took the new one) -> the
record names the new tokens -> the files (token, then its metadata: the metadata's accessor changing
is the pod side's signal) -> the new tokens leave the queue. A failure after the mint and before the
metadata file is written undoes in reverse (the files put back too); after it, the pod may hold the
new token and nothing is undone. All under the volume's lock, so a concurrent unmount waits and then
revokes the new token.

A rotation killed half-way leaves its entries, which name their volume: the agent's retry takes that
volume's lock (no rotation of it is then under way) and keeps whatever the record names (`settle`,
`owed`): the pod's token is never revoked, every other one is. The one step the record alone cannot
tell is a kill between the record and the metadata file: the pod never saw the new token, so the
record is put back to name the old one, which the pod holds.

Volumes rotated: wrapped, minted with the generator token, if the policy bindings in force now allow
the volume's policies to its namespace and service account (checked as a mount's admission checks
them, Engine.check_bindings; refused: a failed rotation, nothing minted). The new token is named as
the mount's was (record.token_identity), with `rotated_from`. Not rotated (and said why): an unwrapped
volume (the pod holds the plain token: nobody would switch to a new one) and a pod-login volume
(minting needs the pod's own service-account JWT, which only the kubelet's publish carries).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable

from .. import log
from ..config import parse_duration
from ..errors import DriverError, Forbidden, TokenNotWrapped
from . import generator, intents
from .record import Minted, VolumeRecord

# `engine` below is an operation.Engine, not imported: operation imports this module (its retry).
Engine = Any

DEFAULT_GRACE = 600.0  # seconds the old token may live after a rotation if the pod side never takes the new one
# A rotation's new tokens wait this long in the queue for a retry that cannot tell a dead rotation from
# one under way: an older version's, or an entry that does not name its volume.
NEW_TOKEN_GRACE = 300.0
ROTATING, ROTATED = "rotation in progress", "rotated"


def chosen(records: list[VolumeRecord], pod_uid: str | None = None, namespace: str | None = None) -> list[VolumeRecord]:
    """The volumes matching every filter given (none: every volume on the node)."""
    return [r for r in records if r.accessor and (not pod_uid or r.pod_uid == pod_uid)
            and (not namespace or r.namespace == namespace)]


def rotate(engine: Engine, records: list[VolumeRecord], grace: float = DEFAULT_GRACE) -> list[dict[str, Any]]:
    """Rotate each volume; one result per volume: {mount_dir, pod_uid, namespace, pod, outcome, ...}."""
    results = []
    for record in records:
        logger = log.get(verb="rotate", dir=record.mount_dir, pod_uid=record.pod_uid)
        base = {"mount_dir": record.mount_dir, "pod_uid": record.pod_uid, "namespace": record.namespace,
                "pod": record.pod}
        try:
            results.append({**base, **_rotate_one(engine, record.mount_dir, grace, logger)})
        except DriverError as exc:
            logger.warning("rotation failed", error=str(exc))
            results.append({**base, "outcome": "failed", "error": str(exc)})
    return results


def _rotate_one(engine: Engine, mount_dir: str, grace: float, logger) -> dict[str, Any]:
    config, fs, store = engine.config, engine.fs, engine.store
    with store.locked(mount_dir), contextlib.ExitStack() as undo:
        record = store.read_volume(mount_dir)
        real = engine.real(mount_dir)
        info = fs.mount_info(real)
        if record is None or not record.accessor:
            return {"outcome": "skipped", "why": "the volume is gone (unmounted meanwhile)"}
        if not fs.is_mount_point(mount_dir) or not info or info["source"] != "vaulttmpfs":
            return {"outcome": "skipped", "why": "not mounted (a record only: reconcile or a republish handles it)"}
        name = config.token_filename
        meta = json.loads(fs.read_small_file(os.path.join(mount_dir, name + ".json"), 64 * 1024, follow=False))
        if meta.get("unwrapped"):
            return {"outcome": "skipped", "why": "vault/unwrap volume: the pod holds the plain token; restart the "
                                                 "pod for a new one"}
        if str(meta.get("creation_path", "")).endswith("/login"):
            return {"outcome": "skipped", "why": "pod-login volume: a new login needs the pod's service-account "
                                                 "token, which only the kubelet's publish carries"}
        identity = _identity(engine, record, real)
        _refuse_if_unbound(engine, identity, logger)  # before anything is minted, as a mount's admission
        token = generator.read_token(config.generator_token_path)
        log.secret(token)
        engine._refuse_root_generator(token)
        metadata, display_name = identity.token_identity(config.node_name, rotated_from=record.accessor)
        client = engine.vault(config, token)
        # Noted before the mint, as a mount's create is (engine.intents): killed before its new tokens are
        # queued, the rotation leaves them counted (status, doctor, /metrics) instead of recorded nowhere.
        intent = intents.Intent(store, engine.request_of(record, mount_dir), config, client, logger)
        undo.push(intent)
        asked = time.time()
        try:
            wrap = client.create_wrapped_token(record.role, list(record.policies), metadata, display_name)
        except TokenNotWrapped as exc:  # a proxy stripped X-Vault-Wrap-TTL: a live token no volume will hold
            outcome = engine.revoke_or_queue(VolumeRecord(exc.accessor, pod_uid=record.pod_uid), logger,
                                             why="Vault returned the rotated token unwrapped")
            raise DriverError(f"{exc}; the volume keeps its token, the unwrapped one: {outcome}") from None
        intent.minted = True
        minted = Minted(wrap["token"], wrap, wrap["wrapped_accessor"], wrap.get("accessor"))
        log.secret(minted.secret)
        new = VolumeRecord(minted.accessor, minted.wrapping_accessor)
        now = time.time()
        # Vault made the new wrapping token after we asked: it cannot expire before this. Gone sooner, the
        # pod unwrapped it (due).
        watch_until = asked + _wrap_ttl(wrap, config)
        _on_failure(undo, lambda: engine.revoke_or_queue(new, logger, why="rotation failed"))
        # Each entry names its volume: the retry weighs it against that volume's record (settle).
        volume = {"pod_uid": record.pod_uid, "mount_dir": mount_dir}
        for accessor in new.accessors():
            store.add_pending(accessor, {"why": ROTATING, **volume, "not_before": now + NEW_TOKEN_GRACE})
        intent.done()  # the new tokens are in the queue: revoked or kept as the volume's record says
        for accessor in record.accessors():
            # Due once the pod took the new token (its wrapping token gone before it could expire), or
            # after the grace period.
            store.add_pending(accessor, {"why": ROTATED, **volume, "not_before": now + grace,
                                         "watch": minted.wrapping_accessor, "watch_until": watch_until})
        _on_failure(undo, lambda: [store.drop_pending(a) for a in record.accessors()])
        store.write_volume(mount_dir, record.replace(accessor=minted.accessor,
                                             wrapping_accessor=minted.wrapping_accessor)).wait()
        _on_failure(undo, lambda: store.write_volume(mount_dir, record).wait())
        _write_files(engine, mount_dir, real, info, record, minted)  # puts the files back if it fails
        # The metadata file names the new token: the pod may take it from now on, so nothing is undone.
        undo.pop_all()
        try:
            for accessor in new.accessors():
                store.drop_pending(accessor)
        except OSError as exc:  # as a kill here: the retry keeps them (the volume's record names them)
            logger.warning("the new tokens could not leave the revocation queue: the agent's retry keeps them, "
                           "as the volume's record names them", error=exc.strerror or str(exc))
    logger.info("rotated", accessor=minted.accessor, old_accessor=record.accessor, grace=grace)
    return {"outcome": "rotated", "accessor": minted.accessor[:8], "old_accessor": record.accessor[:8]}


def _identity(engine: Engine, record: VolumeRecord, real: str) -> VolumeRecord:
    """The record, its volume named: a record an older version wrote does not name it, the volume's path
    does (the kubelet's layout of either front end)."""
    if record.volume_name:
        return record
    from .layout import CSI, FLEXVOLUME

    for layout in (FLEXVOLUME, CSI):
        with contextlib.suppress(DriverError):
            return record.replace(volume_name=layout.parts(record.mount_dir, engine.config.pods_dir, real)[1])
    return record


def _refuse_if_unbound(engine: Engine, record: VolumeRecord, logger) -> None:
    """DriverError (a failed rotation) when the policy bindings in force now would refuse this volume's
    mount: checked as a mount's admission checks them (engine.check_bindings). A record an older version
    wrote does not name the service account: checked without it, refused if the bindings need it."""
    try:
        engine.check_bindings(record.namespace, record.service_account or None, list(record.policies), logger)
    except DriverError as exc:
        reason = str(exc).removesuffix("; nothing was mounted")
        refusal = Forbidden if isinstance(exc, Forbidden) else DriverError
        raise refusal(f"not rotated: {reason}; the volume keeps the token it holds, minted when the bindings "
                        "allowed it (delete the pod, or revoke that token, if it must not keep it)") from None


def _write_files(engine: Engine, mount_dir: str, real: str, info: dict[str, str], record: VolumeRecord,
                 minted: Minted) -> None:
    fs, name = engine.fs, engine.config.token_filename
    read_only = "ro" in info["options"].split(",")
    with fs.opened_mount(mount_dir, real) as tmpfs:
        if record.made_with:
            group = record.made_with.fs_group
        else:  # a record older than made_with: the group the volume's token file has now
            held = os.stat(os.path.join(tmpfs, name), follow_symlinks=False)
            group = held.st_gid if held.st_mode & 0o040 else None
        mode = 0o440 if group is not None else 0o400
        # The token first, its metadata last: the metadata naming a new accessor is the pod side's
        # signal, and by then the token it names is in place.
        files = ((name, minted.secret.encode()), (name + ".json", json.dumps(minted.info, indent=2).encode() + b"\n"))
        try:
            before = {file: _held_file(fs, tmpfs, file) for file, _ in files}  # put back if this fails
        except OSError as exc:
            raise DriverError(f"cannot read the token files of {mount_dir}: {exc.strerror}") from None
        if read_only:
            fs.remount_writable(tmpfs)
        written: list[str] = []
        try:
            try:
                for file, data in files:
                    fs.write_file(tmpfs, file, data, mode, group)
                    written.append(file)
            except OSError as exc:
                raise DriverError(f"cannot write the rotated token into {mount_dir}: {exc.strerror}") from None
            if read_only:
                fs.remount_readonly(tmpfs)
                read_only = False
        except BaseException:
            # The files as they were (the metadata first: a pod side looking in between sees one file new
            # and one old, and skips the look), so the pod never sees the new token the undo revokes.
            for file in reversed(written):
                data, file_mode, file_group = before[file]
                with contextlib.suppress(OSError):
                    fs.write_file(tmpfs, file, data, file_mode, file_group)
            raise
        finally:
            if read_only:
                fs.remount_readonly(tmpfs)


def _held_file(fs, directory: str, name: str) -> tuple[bytes, int, int]:
    """A volume file's bytes, mode and group, as write_file takes them."""
    held = os.stat(os.path.join(directory, name), follow_symlinks=False)
    return fs.read_small_file(os.path.join(directory, name), 64 * 1024, follow=False), held.st_mode & 0o7777, \
        held.st_gid


def _wrap_ttl(wrap: dict[str, Any], config) -> float:
    """The new wrapping token's TTL, as Vault gave it (VAULT_WRAP_TTL if it did not say)."""
    ttl = wrap.get("ttl")
    return float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else parse_duration(config.wrap_ttl,
                                                                                        "VAULT_WRAP_TTL")


def _on_failure(undo: contextlib.ExitStack, step_undo: Callable[[], object]) -> None:
    def undo_if_failed(exc_type, _exc, _tb) -> bool:
        if exc_type is not None:
            with contextlib.suppress(Exception):  # the caller hears of the failure that made us undo
                step_undo()
        return False

    undo.push(undo_if_failed)


def held_back(pending: dict[str, Any], now: float | None = None) -> bool:
    """Not owed yet: a rotation keeps it until its `not_before` (or sooner, see `due`). Counted apart
    from the revocations Vault has not taken (doctor, /metrics, status): a rotation's grace is no fault."""
    not_before = pending.get("not_before")
    return isinstance(not_before, (int, float)) and (time.time() if now is None else now) < not_before


def due(pending: dict[str, Any], gone: Callable[[str], bool], now: float | None = None) -> bool:
    """May the agent revoke this queued token now? Yes unless it waits (`not_before`) for a rotation:
    then when its time comes, or sooner once the pod took the new token: the wrapping token it `watch`es
    is gone before `watch_until`, when it could not have expired yet (so it was unwrapped). A lookup
    after that time cannot tell an unwrap from an expiry, so the grace decides (it is not asked).
    An entry an older version wrote (no `watch_until`): gone at any time counts as taken.
    For a rotation's token of a volume whose record may name it, ask `owed` (under the volume's lock)."""
    if not held_back(pending, now):
        return True
    watch, until = pending.get("watch"), pending.get("watch_until")
    if not isinstance(watch, str) or not watch:
        return False
    if not isinstance(until, (int, float)):
        return gone(watch)
    clock = time.time if now is None else (lambda: now)
    # The clock read again after the lookup: its answer came before `until`, so it saw an unwrap.
    return clock() < until and gone(watch) and clock() < until


def volumes_of(queue: list[dict[str, Any]], records: Callable[[], list[VolumeRecord]]) -> dict[str, str]:
    """accessor -> volume dir, for each token a rotation queued: the dir its entry names, or (an entry
    written before they named it) the volume whose record names the token or the new wrapping token it
    `watch`es. A token of no volume is not here: no record names it."""
    rotations = [p for p in queue if p.get("why") in (ROTATING, ROTATED)]
    named: dict[str, str] = {}
    if any(not _dir_of(p) for p in rotations):
        named = {a: r.mount_dir for r in records() for a in r.accessors() if r.mount_dir}
    found = {}
    for pending in rotations:
        watch = pending.get("watch")
        mount_dir = _dir_of(pending) or named.get(pending["accessor"]) or (
            named.get(watch) if isinstance(watch, str) else None)
        if mount_dir:
            found[pending["accessor"]] = mount_dir
    return found


def _dir_of(pending: dict[str, Any]) -> str:
    mount_dir = pending.get("mount_dir")
    return mount_dir if isinstance(mount_dir, str) else ""


def settle(engine: Engine, mount_dir: str, logger) -> VolumeRecord | None:
    """The volume's record, which its rotation's queued tokens are kept or revoked by (None: the volume
    is gone). The caller holds the volume's lock: a rotation whose new tokens are still ROTATING died.
    Killed after its record named them but before the metadata file did, it never reached the pod,
    which holds the old token still: the record is put back to name that one. Only to tokens this
    rotation queued as the ones it replaced: on a read-write volume the metadata file is the pod's
    to write, so it may choose between the two, never name another token."""
    store = engine.store
    record = engine._volume_record(mount_dir)
    if record is None or not any(_queued_as(store, a, ROTATING) for a in record.accessors()):
        return record
    held, new_wrapping = engine._record_on_volume(mount_dir), record.wrapping_accessor
    if held is None or not new_wrapping or not _replaced_by(store, held.accessor, new_wrapping):
        return record  # the files name the new tokens: the rotation got as far as the pod
    wrapping = held.wrapping_accessor if _replaced_by(store, held.wrapping_accessor, new_wrapping) else None
    restored = record.replace(accessor=held.accessor, wrapping_accessor=wrapping)
    store.write_volume(mount_dir, restored).wait()
    logger.warning("a rotation killed before the volume's files named its new token: the record names the "
                   "pod's token again, the new one is revoked", accessor=restored.accessor,
                   revoked=record.accessor, dir=mount_dir)
    return restored


def owed(pending: dict[str, Any], record: VolumeRecord | None, gone: Callable[[str], bool]) -> bool:
    """Is a rotation's token that its volume's record (settled, under the lock) does not name due? At
    once if the volume is gone or the rotation that queued it died; an old token as `due` says."""
    return record is None or pending.get("why") == ROTATING or due(pending, gone)


def _queued_as(store, accessor: str, why: str) -> bool:
    pending = store.read_pending(accessor)
    return pending is not None and pending.get("why") == why


def _replaced_by(store, accessor: str | None, new_wrapping: str) -> bool:
    """Did the rotation whose new wrapping token is `new_wrapping` queue `accessor` as an old token?"""
    pending = store.read_pending(accessor) if accessor else None
    return pending is not None and pending.get("why") == ROTATED and pending.get("watch") == new_wrapping
