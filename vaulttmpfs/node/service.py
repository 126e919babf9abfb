"""What the agent runs: a `Service` (start, stop, status, health, its own /metrics families), and
`Loop`, a service that does one round in a thread, waits, and does the next."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import log
from ..errors import DriverError

FAILURE_RETRY = 10.0  # after a failed round, try again this soon (or sooner if the interval is shorter)
MIN_INTERVAL = 1.0


@dataclass(frozen=True)
class Family:
    """One metric family a service reports at scrape time, in plain data: the service needs no
    Prometheus library; `node.metrics` turns it into one. `samples`: (label values, value) pairs."""

    kind: str  # "gauge" or "counter"
    name: str
    help: str
    labels: tuple[str, ...] = ()
    samples: tuple[tuple[tuple[str, ...], float], ...] = field(default=())

    @classmethod
    def single(cls, kind: str, name: str, help: str, value: float) -> Family:
        return cls(kind, name, help, samples=(((), value),))


class Service:
    """Something the agent starts, stops and reports on."""

    name = "service"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}

    def healthy(self) -> bool:
        return True

    def alive(self) -> bool:
        return True

    def metric_families(self) -> list[Family]:
        """This service's families for /metrics, read at scrape time (none by default)."""
        return []


class Loop(Service):
    """Calls `run_once()` in a thread; it returns the seconds to wait before the next call."""

    min_interval = MIN_INTERVAL

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> float:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.run_once()
            except Exception as exc:  # noqa: BLE001 -- a bug in one round must not end the loop
                log.get().error("agent loop error", service=self.name, exc_info=exc)
                delay = FAILURE_RETRY
            self._stop.wait(max(delay, self.min_interval))

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())


class Rounds(Loop):
    """A Loop doing one round of `work()` every `interval`. A round that fails (Vault away, a state dir
    not trusted) is recorded in `last_error` and logged as `failure`; the next round comes as usual."""

    failure = "round failed"

    def __init__(self, config, interval: float, state: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.interval = interval
        self.state: dict[str, Any] = {**state, "last_run": None, "last_error": None}

    def work(self) -> Any:
        raise NotImplementedError

    def done(self, result: Any) -> None:
        """Record a round that ran (in `self.state`)."""
        raise NotImplementedError

    def run_once(self) -> float:
        try:
            result = self.work()
        except (DriverError, OSError) as exc:
            self.state.update(last_error=str(exc), last_run=iso(time.time()))
            log.get(service=self.name).warning(self.failure, error=str(exc))
            return self.interval
        self.done(result)
        return self.interval

    def status(self) -> dict[str, Any]:
        return dict(self.state)


def iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
