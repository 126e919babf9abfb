"""The node's token inventory: which pod tokens it minted are still alive in Vault, per namespace,
how old the oldest is and how soon the next one expires.

`take` asks Vault (one lookup-accessor per volume: properties, never the token) and keeps the answer
as a note in the state dir; `summary` joins that note with the volume records offline, so
`vaulttmpfs status` and /metrics answer without a Vault call (and while Vault is down: the note then
says how old it is). Only the node's own records are looked up: the inventory never lists Vault.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import log
from ..config import Config
from ..errors import DriverError
from ..vault.client import Vault  # hvac itself is imported only when a call is made
from . import generator

if TYPE_CHECKING:
    from .interfaces import Store, VaultFactory
    from .record import VolumeRecord

NOTE = "inventory"


def take(config: Config, store: Store, vault: VaultFactory | None = None, now: float | None = None) -> dict[str, Any]:
    """Look up every held pod token; the note written: {"at": unix time, "tokens": {accessor: entry}},
    entry {"alive": bool, "created": unix time, "expires": unix time or None (no expiry)}."""
    vault = vault or Vault
    records = [r for r in store.list_volumes() if r.accessor]
    at = time.time() if now is None else now
    tokens: dict[str, dict[str, Any]] = {}
    if records:
        token = generator.read_token(config.generator_token_path)
        log.secret(token)
        client = vault(config, token)
        for record in records:
            try:
                found = client.lookup_accessor(record.accessor)
            except DriverError as exc:  # one unreadable token costs its entry, not the inventory
                log.get(verb="inventory").warning("token lookup failed", accessor=record.accessor, error=str(exc))
                continue
            tokens[record.accessor] = _entry(found, at)
    note = {"at": at, "tokens": tokens}
    if records or store.read_note(NOTE) is not None:  # a node that never held a volume gets no state dir
        store.write_note(NOTE, note)
    return note


def _entry(found: dict[str, Any] | None, at: float) -> dict[str, Any]:
    if found is None:
        return {"alive": False}
    ttl = found.get("ttl")
    created = found.get("creation_time")
    return {"alive": True, "created": created if isinstance(created, (int, float)) else None,
            # ttl 0 on a token with no expire_time: it never expires (a root-like token; not ours to mint).
            "expires": at + ttl if isinstance(ttl, (int, float)) and ttl > 0 else None}


def summary(records: list[VolumeRecord], note: dict[str, Any] | None, now: float | None = None) -> dict[str, Any]:
    """What the node holds, by the last inventory: alive tokens by namespace, gone ones, ones not yet
    looked up (minted since), the oldest alive token's age and the soonest expiry, in seconds."""
    now = time.time() if now is None else now
    tokens = (note or {}).get("tokens") or {}
    alive: dict[str, int] = {}
    gone = unknown = 0
    ages, expiries = [], []
    for record in records:
        if not record.accessor:
            continue
        entry = tokens.get(record.accessor)
        if entry is None:
            unknown += 1
            continue
        if not entry.get("alive"):
            gone += 1
            continue
        namespace = record.namespace or "-"
        alive[namespace] = alive.get(namespace, 0) + 1
        if entry.get("created") is not None:
            ages.append(max(0.0, now - entry["created"]))
        if entry.get("expires") is not None:
            expiries.append(max(0.0, entry["expires"] - now))
    return {
        "taken_seconds_ago": round(now - note["at"], 1) if note and "at" in note else None,
        "alive_by_namespace": dict(sorted(alive.items())),
        "alive": sum(alive.values()),
        "gone": gone,
        "not_looked_up": unknown,
        "oldest_age_seconds": round(max(ages)) if ages else None,
        "next_expiry_seconds": round(min(expiries)) if expiries else None,
    }


def entry_for(record: VolumeRecord, note: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """One volume's line in the inventory: alive (None: not looked up yet) and seconds to expiry."""
    entry = ((note or {}).get("tokens") or {}).get(record.accessor or "")
    if entry is None:
        return {"alive": None, "expires_in_seconds": None}
    expires = entry.get("expires")
    return {"alive": bool(entry.get("alive")),
            "expires_in_seconds": max(0, round(expires - now)) if entry.get("alive") and expires else None}
