"""Retries the revocations unmount queued while Vault was unreachable."""

from __future__ import annotations

import time
from typing import Any

from .. import log
from ..config import Config
from ..engine import operation
from .service import Rounds, iso

DEFAULT_RETRY_INTERVAL = 60.0


class RevocationRetry(Rounds):
    name = "revocations"
    failure = "revocation retry failed"

    def __init__(self, config: Config, interval: float = DEFAULT_RETRY_INTERVAL):
        super().__init__(config, interval, {"revoked": 0, "pending": None})

    def work(self) -> dict[str, Any]:
        return operation.retry_pending(self.config)

    def done(self, result: dict[str, Any]) -> None:
        self.state.update(revoked=self.state["revoked"] + result["revoked"], pending=result["pending"],
                          last_run=iso(time.time()), last_error=None)
        if result["revoked"] or result["pending"]:
            log.get(service=self.name).info("revocations retried", **result)
