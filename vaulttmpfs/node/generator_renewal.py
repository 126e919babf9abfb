"""Keeps the node's generator token alive: renews it every interval, or at half its lease, whichever
comes first."""

from __future__ import annotations

import time
from typing import Any

from .. import log
from ..config import Config
from ..engine import generator
from ..errors import DriverError
from .service import FAILURE_RETRY, MIN_INTERVAL, Family, Loop, iso

NO_EXPIRY_RECHECK = 3600.0


class GeneratorRenewal(Loop):
    """Renews the generator token at half its lease, or every `interval` seconds when that is sooner."""

    name = "generator"

    def __init__(self, config: Config, interval: float | None = None):
        super().__init__()
        self.config = config
        self.interval = interval
        self.state: dict[str, Any] = {"valid": False, "renewals": 0, "failures": 0, "last_error": "not renewed yet"}
        self._valid_until: float | None = None
        self._warned_interval_too_long = False

    def run_once(self) -> float:
        logger = log.get(service=self.name)
        try:
            auth = generator.renew(self.config)
        except DriverError as exc:
            if "not renewable" not in str(exc):
                return self._failed(logger, str(exc))
            return self._not_renewable(logger)
        except Exception as exc:  # e.g. an odd answer from a proxy: report it, keep going
            logger.error("unexpected error renewing the generator token", exc_info=exc)
            return self._failed(logger, f"unexpected error: {type(exc).__name__}: {exc}")
        return self._renewed(logger, auth)

    def _renewed(self, logger, auth: dict[str, Any], event: str = "generator token renewed",
                 renewal: bool = True) -> float:
        lease = float(auth.get("lease_duration") or 0)
        next_in = self._next_renewal_in(lease, logger)
        self._valid_until = time.time() + lease if lease else None
        self.state.update(valid=True, renewals=self.state["renewals"] + renewal, last_error=None,
                          last_renewal=iso(time.time()), lease_duration=lease, renew_interval=next_in,
                          policies=auth.get("policies") or [])
        logger.info(event, lease_duration=lease, next_in=next_in,
                    accessor=log.accessor_hint(auth.get("accessor")))  # any generator may revoke by accessor
        return next_in

    def _next_renewal_in(self, lease: float, logger) -> float:
        if self.interval is None:
            return max(lease / 2, MIN_INTERVAL)
        next_in = within_half_of(lease, self.interval)
        if next_in < self.interval and not self._warned_interval_too_long:
            # Past half the lease, one late or failed renewal and the token expires: gone for good.
            self._warned_interval_too_long = True
            logger.warning("renew interval longer than half the generator token's lease: renewing at half "
                           "the lease instead", renew_interval=self.interval, lease_duration=lease)
        return next_in

    def _not_renewable(self, logger) -> float:
        # A token without a TTL (e.g. root in a lab) needs no renewal; one with a TTL will die.
        try:
            info = generator.lookup(self.config)
        except DriverError as exc:
            return self._failed(logger, str(exc))
        ttl = float(info.get("ttl") or 0)
        if ttl:
            return self._failed(logger, f"the generator token is not renewable and expires in {ttl:.0f}s; "
                                        "re-run `vaulttmpfs bootstrap` with a renewable (periodic) token")
        self._valid_until = None
        self.state.update(valid=True, last_error=None, lease_duration=0, last_renewal=None,
                          renew_interval=self.interval or NO_EXPIRY_RECHECK)
        logger.info("generator token does not expire; nothing to renew")
        return self.interval or NO_EXPIRY_RECHECK

    def _failed(self, logger, message: str) -> float:
        still_valid = self._valid_until is not None and time.time() < self._valid_until
        self.state.update(valid=still_valid, last_error=message, last_failure=iso(time.time()),
                          failures=self.state["failures"] + 1)
        logger.warning("generator token renewal failed", error=message)
        return within_half_of(self._lease_left(), min(self.interval or FAILURE_RETRY, FAILURE_RETRY))

    def _lease_left(self) -> float:
        return self._valid_until - time.time() if self._valid_until is not None else 0.0

    def status(self) -> dict[str, Any]:
        expires_in = None if self._valid_until is None else max(0, round(self._valid_until - time.time()))
        return {**self.state, "expires_in": expires_in, "healthy": self.healthy()}

    def healthy(self) -> bool:
        if self.state["last_error"] is not None:
            return False
        return self._valid_until is None or time.time() < self._valid_until

    def metric_families(self) -> list[Family]:
        status = self.status()
        found = []
        if status.get("expires_in") is not None:
            found.append(Family.single("gauge", "vaulttmpfs_generator_token_ttl_seconds",
                                       "Seconds the generator token stays valid without another renewal",
                                       status["expires_in"]))
        found.append(Family.single("gauge", "vaulttmpfs_generator_renewal_ok",
                                   "1 if the last renewal (or login) succeeded",
                                   1 if status.get("last_error") is None else 0))
        found.append(Family("counter", "vaulttmpfs_generator_renewals", "Generator token renewals by result",
                            ("result",), ((("success",), status.get("renewals", 0)),
                                          (("failure",), status.get("failures", 0)))))
        return found


def within_half_of(lease: float, wanted: float) -> float:
    """`wanted` seconds, but no more than half of `lease` when one is known (nor, for that bound, less
    than MIN_INTERVAL: a lease of a second must not make a hot loop)."""
    if lease <= 0:
        return wanted
    return min(wanted, max(lease / 2, MIN_INTERVAL))
