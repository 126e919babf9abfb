"""Revokes the tokens of volumes whose pod dir the kubelet removed without calling unmount."""

from __future__ import annotations

import time
from typing import Any

from .. import log
from ..config import Config
from ..engine import reconcile
from .service import Family, Rounds, iso

DEFAULT_RECONCILE_INTERVAL = 60.0
MIN_RECONCILE_INTERVAL = 0.05  # a reconcile round is local (a listdir and an lstat per volume): cheap
RECENT_REVOCATIONS = 10


class ReconcileLoop(Rounds):
    name = "reconcile"
    failure = "reconcile failed"
    min_interval = MIN_RECONCILE_INTERVAL

    def __init__(self, config: Config, interval: float = DEFAULT_RECONCILE_INTERVAL):
        super().__init__(config, interval, {"interval": interval, "rounds": 0, "revoked": 0, "queued": 0,
                                            "by_reason": {}, "volumes": None, "recent": []})

    def work(self) -> dict[str, Any]:
        return reconcile.reconcile(self.config)

    def done(self, result: dict[str, Any]) -> None:
        state = self.state
        state["rounds"] += 1
        for done in result["volumes"]:
            if done["action"] in ("revoked", "queued"):
                state[done["action"]] += 1
                # Replaced, never changed in place: /healthz copies it from another thread.
                reason = done["reason"]
                state["by_reason"] = {**state["by_reason"], reason: state["by_reason"].get(reason, 0) + 1}
                recent = {k: done[k] for k in ("mount_dir", "pod_uid", "namespace", "pod", "action", "reason")}
                state["recent"] = ([{**recent, "round": state["rounds"], "at": iso(time.time())}]
                                   + state["recent"])[:RECENT_REVOCATIONS]
        error = "; ".join(result["errors"]) or None
        if error and error != state["last_error"]:  # once per new error, not every round
            log.get(service=self.name).warning("reconcile incomplete", error=error)
        state.update(volumes=result["checked"], last_run=iso(time.time()), last_error=error)

    def metric_families(self) -> list[Family]:
        status = self.status()
        by_reason = status["by_reason"]
        return [
            Family("counter", "vaulttmpfs_reconcile_revocations",
                   "Tokens reconcile revoked (or queued) because their volume dir was gone", ("reason",),
                   tuple(((reason,), by_reason.get(reason, 0)) for reason in reconcile.REVOKE_REASONS)),
            Family.single("counter", "vaulttmpfs_reconcile_rounds", "Reconcile passes over the volume records",
                          status["rounds"]),
        ]
