"""On-demand rotation (`vaulttmpfs rotate`): each chosen volume gets a freshly minted wrapped token,
its files replaced atomically; the old token is queued for revocation once the pod side took the new
one (the new wrapping token is gone: unwrapped, or expired) or after a grace period.

Order, so that a kill -9 at any step leaves no token nobody would revoke:
mint -> queue the NEW tokens (due in NEW_TOKEN_GRACE: revoked if the rotation never completes) ->
queue the OLD tokens (due after the grace period, or once the pod took the new one) -> the record
names the new tokens -> the files (token, then its metadata: the metadata's accessor changing is the
pod side's signal) -> the new tokens leave the queue. A failure after the mint undoes in reverse.
All under the volume's lock, so a concurrent unmount waits and then revokes the new token.

Volumes rotated: wrapped, minted with the generator token. Not rotated (and said why): an unwrapped
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
from ..errors import DriverError
from . import generator
from .record import Minted, VolumeRecord

# `engine` below is an operation.Engine, not imported: operation imports this module (for `due`).
Engine = Any

DEFAULT_GRACE = 600.0  # seconds the old token may live after a rotation if the pod side never takes the new one
NEW_TOKEN_GRACE = 300.0  # a rotation killed half-way: its new token is revoked this long after
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
        token = generator.read_token(config.generator_token_path)
        log.secret(token)
        engine._refuse_root_generator(token)
        metadata = {"created_by": "vaulttmpfs", "namespace": record.namespace, "pod": record.pod,
                    "pod_uid": record.pod_uid, "volume": os.path.basename(mount_dir), "node": config.node_name,
                    "rotated_from": record.accessor}
        who = "-".join(p for p in (record.namespace, record.pod) if p) or "pod"
        wrap = engine.vault(config, token).create_wrapped_token(
            record.role, list(record.policies), {k: v for k, v in metadata.items() if v},
            f"vaulttmpfs-{who}"[:100])
        minted = Minted(wrap["token"], wrap, wrap["wrapped_accessor"], wrap.get("accessor"))
        log.secret(minted.secret)
        new = VolumeRecord(minted.accessor, minted.wrapping_accessor)
        now = time.time()
        _on_failure(undo, lambda: engine.revoke_or_queue(new, logger, why="rotation failed"))
        for accessor in new.accessors():
            store.add_pending(accessor, {"why": ROTATING, "pod_uid": record.pod_uid,
                                         "not_before": now + NEW_TOKEN_GRACE})
        for accessor in record.accessors():
            # Due once the pod took the new token (its wrapping token is gone), or after the grace period.
            store.add_pending(accessor, {"why": ROTATED, "pod_uid": record.pod_uid, "not_before": now + grace,
                                         "watch": minted.wrapping_accessor})
        _on_failure(undo, lambda: [store.drop_pending(a) for a in record.accessors()])
        store.write_volume(mount_dir, record.replace(accessor=minted.accessor,
                                             wrapping_accessor=minted.wrapping_accessor)).wait()
        _on_failure(undo, lambda: store.write_volume(mount_dir, record).wait())
        _write_files(engine, mount_dir, real, info, record, minted)
        for accessor in new.accessors():
            store.drop_pending(accessor)
    logger.info("rotated", accessor=minted.accessor, old_accessor=record.accessor, grace=grace)
    return {"outcome": "rotated", "accessor": minted.accessor[:8], "old_accessor": record.accessor[:8]}


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
        if read_only:
            fs.remount_writable(tmpfs)
        try:
            # The token first, its metadata last: the metadata naming a new accessor is the pod side's
            # signal, and by then the token it names is in place.
            fs.write_file(tmpfs, name, minted.secret.encode(), mode, group)
            fs.write_file(tmpfs, name + ".json", json.dumps(minted.info, indent=2).encode() + b"\n", mode, group)
        except OSError as exc:
            raise DriverError(f"cannot write the rotated token into {mount_dir}: {exc.strerror}") from None
        finally:
            if read_only:
                fs.remount_readonly(tmpfs)


def _on_failure(undo: contextlib.ExitStack, step_undo: Callable[[], object]) -> None:
    def undo_if_failed(exc_type, _exc, _tb) -> bool:
        if exc_type is not None:
            with contextlib.suppress(Exception):  # the caller hears of the failure that made us undo
                step_undo()
        return False

    undo.push(undo_if_failed)


def due(pending: dict[str, Any], gone: Callable[[str], bool], now: float | None = None) -> bool:
    """May the agent revoke this queued token now? Yes unless it waits (`not_before`) for a rotation:
    then when its time comes, or sooner once the token it `watch`es (the new wrapping token) is gone."""
    not_before = pending.get("not_before")
    if not isinstance(not_before, (int, float)):
        return True
    if (time.time() if now is None else now) >= not_before:
        return True
    watch = pending.get("watch")
    return isinstance(watch, str) and bool(watch) and gone(watch)
