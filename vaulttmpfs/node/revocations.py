"""Retries the revocations unmount queued while Vault was unreachable."""

from __future__ import annotations

import time
from typing import Any

from .. import log
from ..config import Config
from ..engine import operation
from ..errors import DriverError
from .service import Loop, iso

DEFAULT_RETRY_INTERVAL = 60.0


class RevocationRetry(Loop):
    name = "revocations"

    def __init__(self, config: Config, interval: float = DEFAULT_RETRY_INTERVAL):
        super().__init__()
        self.config = config
        self.interval = interval
        self.state: dict[str, Any] = {"revoked": 0, "pending": None, "last_run": None, "last_error": None}

    def run_once(self) -> float:
        try:
            result = operation.retry_pending(self.config)
        except (DriverError, OSError) as exc:
            self.state.update(last_error=str(exc), last_run=iso(time.time()))
            log.get(service=self.name).warning("revocation retry failed", error=str(exc))
            return self.interval
        self.state.update(revoked=self.state["revoked"] + result["revoked"], pending=result["pending"],
                          last_run=iso(time.time()), last_error=None)
        if result["revoked"] or result["pending"]:
            log.get(service=self.name).info("revocations retried", **result)
        return self.interval

    def status(self) -> dict[str, Any]:
        return dict(self.state)
