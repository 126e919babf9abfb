"""Takes the node's token inventory (engine.inventory) on a schedule and reports it in /metrics."""

from __future__ import annotations

import time

from ..config import Config
from ..engine import inventory
from ..engine.state import StateStore
from .service import Family, Rounds, iso

DEFAULT_INVENTORY_INTERVAL = 300.0  # one lookup per held volume each round: cheap for Vault at this pace


class InventoryLoop(Rounds):
    name = "inventory"
    failure = "inventory failed"

    def __init__(self, config: Config, interval: float = DEFAULT_INVENTORY_INTERVAL):
        super().__init__(config, interval, {"interval": interval, "rounds": 0})

    def work(self) -> None:
        inventory.take(self.config, StateStore(self.config.state_dir))

    def done(self, result: None) -> None:
        self.state.update(rounds=self.state["rounds"] + 1, last_run=iso(time.time()), last_error=None)

    def metric_families(self) -> list[Family]:
        store = StateStore(self.config.state_dir)
        found = inventory.summary(store.list_volumes(), store.read_note(inventory.NOTE))
        families = [
            Family("gauge", "vaulttmpfs_tokens_alive",
                   "Pod tokens this node minted that Vault still holds alive, at the last inventory (pod_namespace: "
                   "not `namespace`, which Prometheus gives the agent's own pod)", ("pod_namespace",),
                   tuple(((ns,), n) for ns, n in found["alive_by_namespace"].items())),
            Family.single("gauge", "vaulttmpfs_tokens_gone",
                          "Volumes this node holds whose pod token Vault no longer has (expired or revoked elsewhere)",
                          found["gone"]),
            Family.single("gauge", "vaulttmpfs_tokens_not_looked_up",
                          "Volumes minted since the last inventory", found["not_looked_up"]),
        ]
        if found["taken_seconds_ago"] is not None:
            families.append(Family.single("gauge", "vaulttmpfs_inventory_age_seconds",
                                          "Seconds since the last inventory", found["taken_seconds_ago"]))
        if found["oldest_age_seconds"] is not None:
            families.append(Family.single("gauge", "vaulttmpfs_token_oldest_age_seconds",
                                          "Age of the oldest alive pod token this node holds",
                                          found["oldest_age_seconds"]))
        if found["next_expiry_seconds"] is not None:
            families.append(Family.single("gauge", "vaulttmpfs_token_next_expiry_seconds",
                                          "Seconds until the soonest-expiring alive pod token expires "
                                          "(unless its pod renews it)", found["next_expiry_seconds"]))
        return families
