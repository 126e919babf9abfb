"""Reconcile: revoke the token of a volume whose pod the kubelet cleaned up without calling unmount.

The rule follows the kubelet's own orphan cleanup (pkg/kubelet/kubelet_volumes.go,
cleanupOrphanedPodDirs -> removeOrphanedPodVolumeDirs). It touches a pod only when the pod is in
neither its pod list nor its running containers and its volume manager holds no mounted volume
for it; it then rmdir(2)s each volume dir (rmdir cannot remove a mount point or a dir with files)
and only then the pod dir. So a volume dir that is gone means the pod is gone: the kubelet tore it
down (our unmount already dropped the record) or removed it as an orphan (unmount never came).
A dir that is still there is never touched: mounted, it is a live pod's; unmounted (a reboot took
the tmpfs), the kubelet either mounts it again (mount replaces the stale token) or, if the pod is
gone, its orphan cleanup removes the dir and the next round sees that.

Every change happens under the per-volume lock the verbs take, after judging again, so a
reconcile racing a mount or unmount of the same volume sees what that verb left behind.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from .. import log
from ..config import Config
from . import intents, operation, volume
from .record import VolumeRecord
from .state import StateStore

REVOKE, KEEP = "revoke", "keep"
# Why a volume is revoked or kept: short codes (counted, and later metric labels) and their meaning.
REASONS = {
    "pod_dir_removed": "the pod's dir is gone: the kubelet cleaned up the orphaned pod without calling unmount",
    "volume_dir_removed": "the volume dir is gone but unmount never came (the pod dir is still there)",
    "mounted": "the volume is mounted: a live pod's",
    "dir_without_mount": "the dir is there but not mounted (e.g. after a reboot): the kubelet mounts it again, "
                         "which replaces the token, or removes it with the pod",
    "pods_dir_not_visible": "the kubelet's pods dir is not visible here, so nothing can be judged",
    "outside_pods_dir": "the volume is not below VAULTTMPFS_PODS_DIR",
    "unreadable": "the volume dir cannot be examined",
    "dropped_meanwhile": "unmount or mount dropped the record while reconcile waited for the volume's lock",
}

REVOKE_REASONS = ("pod_dir_removed", "volume_dir_removed")


@dataclass
class Outcome:
    mount_dir: str
    action: str  # revoked | queued | would revoke | kept | error
    reason: str
    pod_uid: str = ""
    namespace: str = ""
    pod: str = ""
    accessor: str = ""
    detail: str = ""


def examine(config: Config, mount_dir: str) -> tuple[str, str]:
    """(REVOKE or KEEP, reason code) for one volume dir, from what is on disk now."""
    if not os.path.isdir(config.pods_dir):
        return KEEP, "pods_dir_not_visible"  # e.g. an agent container without the pods dir mounted
    parts = volume.parts_below(mount_dir, config.pods_dir)
    if not parts:
        return KEEP, "outside_pods_dir"
    try:
        os.lstat(mount_dir)
    except (FileNotFoundError, NotADirectoryError):
        pod_dir = os.path.join(config.pods_dir, parts[0])
        return REVOKE, "volume_dir_removed" if os.path.lexists(pod_dir) else "pod_dir_removed"
    except OSError:
        return KEEP, "unreadable"
    return KEEP, "mounted" if volume.is_mount_point(mount_dir) else "dir_without_mount"


def reconcile(config: Config, dry_run: bool = False) -> dict[str, Any]:
    """One pass over the volume records; with dry_run, only says what it would revoke."""
    store = StateStore(config.state_dir)
    logger = log.get(verb="reconcile")
    outcomes = [_one(config, store, record, dry_run, logger) for record in store.list_volumes()]
    if not dry_run:
        intents.prune(store)  # a create's lost answer whose token has expired by now: nothing left to count
    errors = [f"{o.mount_dir}: {o.detail}" for o in outcomes if o.action == "error"]
    if any(o.reason == "pods_dir_not_visible" for o in outcomes):
        errors.insert(0, f"the kubelet's pods dir {config.pods_dir} (VAULTTMPFS_PODS_DIR) is not visible here: "
                         "no volume can be reconciled; run where the kubelet's pods dir is mounted")
    count = lambda action: sum(o.action == action for o in outcomes)  # noqa: E731
    return {"checked": len(outcomes), "revoked": count("revoked"), "queued": count("queued"),
            "would_revoke": count("would revoke"), "kept": count("kept"), "errors": errors,
            "dry_run": dry_run, "volumes": [asdict(o) for o in outcomes]}


def _one(config: Config, store: StateStore, record: VolumeRecord, dry_run: bool, logger) -> Outcome:
    mount_dir = record.mount_dir
    action, reason = examine(config, mount_dir)
    if action == KEEP or dry_run:
        return _outcome(record, "would revoke" if action == REVOKE else "kept", reason)
    try:
        with store.locked(mount_dir):
            return _revoke_locked(config, store, mount_dir, logger)
    except OSError as exc:  # e.g. the state dir is read-only: report it, try the other volumes
        logger.error("reconcile failed", dir=mount_dir, error=str(exc))
        return _outcome(record, "error", reason, str(exc))


def _revoke_locked(config: Config, store: StateStore, mount_dir: str, logger) -> Outcome:
    # Judged again under the lock: a mount or unmount may have run since the first look.
    record = store.read_volume(mount_dir)
    if not record:
        return Outcome(mount_dir, "kept", "dropped_meanwhile", detail=REASONS["dropped_meanwhile"])
    action, reason = examine(config, mount_dir)
    if action == KEEP:
        return _outcome(record, "kept", reason)
    logger.warning("revoking the token of a volume whose pod is gone", reason=reason, why=REASONS[reason],
                   dir=mount_dir, accessor=record.accessor, pod_uid=record.pod_uid, namespace=record.namespace,
                   pod=record.pod)
    revocation = operation.revoke_or_queue(config, store, record, logger, why=f"reconcile: {reason}")
    if operation.is_our_mount(mount_dir):  # e.g. a stale mount still listed at a path that is gone
        try:
            volume.unmount(mount_dir)
        except OSError as exc:  # the record stays: the next round tries again
            logger.error("reconcile could not unmount", dir=mount_dir, error=str(exc))
            return _outcome(record, "error", reason, str(exc))
    store.forget_volume(mount_dir)
    return _outcome(record, "queued" if revocation.queued else "revoked", reason, str(revocation))


def _outcome(record: VolumeRecord, action: str, reason: str, detail: str = "") -> Outcome:
    return Outcome(record.mount_dir, action, reason, record.pod_uid, record.namespace, record.pod,
                   record.accessor or "", detail or REASONS[reason])


def summary(result: dict[str, Any]) -> list[str]:
    """Lines for an operator: each revocation (or would-be one) and why, then the counts."""
    lines = []
    for done in result["volumes"]:
        if done["action"] == "kept":
            continue
        pod = "/".join(p for p in (done["namespace"], done["pod"]) if p) or "?"
        why = REASONS[done["reason"]] if done["action"] == "would revoke" else done["detail"]
        lines.append(f"{done['action']}: {done['mount_dir']} (pod {pod}, uid {done['pod_uid'] or '?'}, "
                     f"accessor {done['accessor'] or '?'}): {why}")
    kept: dict[str, int] = {}
    for done in result["volumes"]:
        if done["action"] == "kept":
            kept[done["reason"]] = kept.get(done["reason"], 0) + 1
    lines += [f"error: {error}" for error in result["errors"]]
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(kept.items()))
    done = f"would revoke {result['would_revoke']}" if result["dry_run"] else f"revoked {result['revoked']}"
    lines.append(f"checked {result['checked']} volume(s): {done}, queued {result['queued']}, kept {result['kept']}"
                 + (f" ({counts})" if counts else "") + (" [dry run: nothing changed]" if result["dry_run"] else ""))
    return lines
