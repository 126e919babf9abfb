"""`vaulttmpfs status`: the volumes this node holds and the revocations it still owes, from the state dir.

Read-only and offline (no Vault call): it answers even while Vault is down, which is when it matters.
Whether each token is still alive in Vault, and when it expires, comes from the agent's last token
inventory (engine.inventory, a note in the state dir), with its age.
Accessors are shown as a prefix, enough to find the token in Vault's audit log, not to act on it.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import Config
from ..engine import intents, inventory, rotate, volume
from ..engine.record import VolumeRecord
from ..engine.state import StateStore

ACCESSOR_PREFIX = 8


def collect(config: Config, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    store = StateStore(config.state_dir)
    records, note = store.list_volumes(), store.read_note(inventory.NOTE)
    volumes = [_volume(record, now, note) for record in records]
    queue = store.list_pending()
    # A rotation's old tokens in their grace are not owed yet: listed apart, not counted as pending.
    pending = [_pending(record, now) for record in queue if not rotate.held_back(record, now)]
    waiting = [{**_pending(record, now), "until": intents.iso(float(record["not_before"]))}
               for record in queue if rotate.held_back(record, now)]
    unrecorded = intents.summary(store, now)
    return {"node": config.node_name, "state_dir": config.state_dir, "volumes": volumes, "pending": pending,
            "rotation_waiting": waiting,
            "inventory": inventory.summary(records, note, now),
            "unrecorded": {"count": unrecorded["count"],
                           "until": unrecorded["until"] and intents.iso(unrecorded["until"]),
                           "creates": [_intent(i) for i in unrecorded["intents"]]}}


def _intent(intent: dict[str, Any]) -> dict[str, Any]:
    return {"at": intents.iso(float(intent["at"])), "until": intents.iso(float(intent["until"])),
            "bound": intent.get("bound", ""), "namespace": intent.get("namespace", ""), "pod": intent.get("pod", ""),
            "pod_uid": intent.get("pod_uid", ""), "policies": intent.get("policies", []),
            "role": intent.get("role", ""), "mount_dir": intent.get("mount_dir", "")}


def _volume(record: VolumeRecord, now: float, note: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        **inventory.entry_for(record, note, now),
        "pod": record.pod,
        "namespace": record.namespace,
        "pod_uid": record.pod_uid,
        "policies": list(record.policies),
        "role": record.role,
        "accessor": _prefix(record.accessor),
        "age_seconds": max(0, round(now - (record.since or now))),
        "mounted": volume.is_mount_point(record.mount_dir),
        "mount_dir": record.mount_dir,
    }


def _pending(record: dict[str, Any], now: float) -> dict[str, Any]:
    return {
        "accessor": _prefix(record.get("accessor")),
        "pod_uid": record.get("pod_uid", ""),
        "why": record.get("why", ""),
        "error": record.get("error", ""),
        "age_seconds": max(0, round(now - float(record.get("since") or now))),
    }


def _prefix(accessor: str | None) -> str:
    return (accessor or "")[:ACCESSOR_PREFIX]


def _expires(v: dict[str, Any]) -> str:
    if v.get("alive") is None:
        return "?"
    if not v["alive"]:
        return "gone"
    return age(v["expires_in_seconds"]) if v.get("expires_in_seconds") is not None else "never"


def _inventory_line(found: dict[str, Any]) -> str:
    if found["taken_seconds_ago"] is None:
        return "token inventory: not taken yet (the agent takes one at start, then every --inventory-interval)"
    by_ns = ", ".join(f"{ns} {n}" for ns, n in found["alive_by_namespace"].items()) or "none"
    parts = [f"token inventory {age(round(found['taken_seconds_ago']))} ago: {found['alive']} alive ({by_ns})"]
    if found["oldest_age_seconds"] is not None:
        parts.append(f"oldest {age(found['oldest_age_seconds'])}")
    if found["next_expiry_seconds"] is not None:
        parts.append(f"next expiry in {age(found['next_expiry_seconds'])}")
    if found["gone"]:
        parts.append(f"{found['gone']} gone from Vault")
    if found["not_looked_up"]:
        parts.append(f"{found['not_looked_up']} minted since")
    return "; ".join(parts)


def age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render(report: dict[str, Any]) -> list[str]:
    waiting = report["rotation_waiting"]
    kept = f", {len(waiting)} kept by a rotation" if waiting else ""
    lines = [f"node {report['node']}: {len(report['volumes'])} volume(s), "
             f"{len(report['pending'])} pending revocation(s){kept} (state dir {report['state_dir']})"]
    lines.append(_inventory_line(report["inventory"]))
    if report["volumes"]:
        lines.append(f"{'NAMESPACE':<20} {'POD':<32} {'POLICIES':<24} {'ACCESSOR':<10} {'AGE':>5} {'EXPIRES':>8}  "
                     "MOUNTED")
        for v in report["volumes"]:
            lines.append(f"{v['namespace'] or '-':<20} {v['pod'] or v['pod_uid'] or '-':<32} "
                         f"{','.join(v['policies']):<24} {v['accessor']:<10} {age(v['age_seconds']):>5} "
                         f"{_expires(v):>8}  {'yes' if v['mounted'] else 'NO (record only)'}")
    unrecorded = report["unrecorded"]
    if unrecorded["count"]:
        lines.append(f"{unrecorded['count']} token(s) whose create lost its answer may be alive, unrecorded (accessor "
                     f"unknown: nothing can revoke them), until {unrecorded['until']} at the latest:")
        for i in unrecorded["creates"]:
            lines.append(f"  {i['at']} {i['namespace'] or '-'}/{i['pod'] or i['pod_uid'] or '-'} "
                         f"{','.join(i['policies']) or '(auth role)'}: until {i['until']} ({i['bound']})")
    if report["pending"]:
        lines.append("pending revocations (the agent retries them; `vaulttmpfs retry-revocations` now):")
        for p in report["pending"]:
            lines.append(f"  {p['accessor']:<10} pod {p['pod_uid'] or '-'} {age(p['age_seconds'])} ago: "
                         f"{p['why']}: {p['error']}")
    if waiting:
        lines.append("kept by a rotation until the pod takes its new token, at the latest until (then revoked):")
        for p in waiting:
            lines.append(f"  {p['accessor']:<10} pod {p['pod_uid'] or '-'} {p['until']}: {p['why']}")
    return lines
