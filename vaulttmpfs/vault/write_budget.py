"""The node's budget of Vault writes in flight at once (VAULTTMPFS_VAULT_WRITE_BUDGET).

Inside the node agent every Vault write goes through vault.client's transport, whoever asks for it: a
CSI worker's create, a relayed FlexVolume call, a revocation retry, the reconciler, a renewal. One
limiter there bounds them all, so a node rebooting with 200 volumes to remount and their old tokens to
revoke never has more than the budget in flight; the others wait for a slot within their own call's
deadline (then fail as VaultBusy: a kubelet call is retried, a revocation stays queued). Reads pass.
A driver process on its own is one call at a time: it sets no budget.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from ..errors import VaultBusy

WRITES = frozenset({"POST", "PUT", "DELETE", "PATCH"})  # LIST and GET are reads


class Budget:
    def __init__(self, size: int):
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0  # the most in flight at once since the agent started
        self.waited = 0  # writes that found every slot taken
        self.refused = 0  # ... and gave up at their deadline

    @contextlib.contextmanager
    def slot(self, deadline: float | None) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self.waited += 1
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not self._slots.acquire(timeout=timeout):
                with self._lock:
                    self.refused += 1
                raise VaultBusy(f"this node already has {self.size} Vault writes in flight "
                                f"(VAULTTMPFS_VAULT_WRITE_BUDGET) and none finished within the call's deadline")
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
            self._slots.release()


_budget: Budget | None = None


def configure(size: int | None) -> Budget | None:
    """The agent sets its budget once at start (None: unbounded, as a driver process is)."""
    global _budget
    _budget = Budget(size) if size else None
    return _budget


def current() -> Budget | None:
    return _budget


@contextlib.contextmanager
def slot(method: str, deadline: float | None) -> Iterator[None]:
    """Hold one of the budget's slots while a write is sent; a read, or no budget, passes at once."""
    budget = _budget
    if budget is None or method.upper() not in WRITES:
        yield
        return
    with budget.slot(deadline):
        yield
