"""The node agent: the long-running half of vaulttmpfs, next to the short-lived driver calls.

It keeps the node's generator token alive, retries revocations that unmount had to queue while
Vault was down, revokes the tokens of volumes whose pod is gone without an unmount (reconcile),
and answers health checks. With `--broker` (the plain DaemonSet's default) it makes the driver
calls' Vault requests for them on warm clients (see broker_server). It never touches a volume whose
dir is there, so stopping it (or a crash) leaves every mounted volume as it is; unmount works
without it. The exception is opt-in: with `--relay` it also serves the driver's older fast path
(see relay), mounting for the kubelet's calls.

This module assembles the agent: `services()` lists what it runs (each a `service.Service` in a
module of its own), `Agent` starts them, serves their health, and stops them.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from .. import log
from ..config import Config
from ..vault import write_budget
from .generator_login import GeneratorLogin
from .generator_renewal import GeneratorRenewal
from .health import DEFAULT_HEALTH_ADDR, HealthServer
from .inventory_loop import DEFAULT_INVENTORY_INTERVAL, InventoryLoop
from .reconcile_loop import DEFAULT_RECONCILE_INTERVAL, ReconcileLoop
from .revocations import DEFAULT_RETRY_INTERVAL, RevocationRetry
from .service import Loop, Service


def services(config: Config, renew_interval: float | None = None,
             retry_interval: float = DEFAULT_RETRY_INTERVAL, relay: bool = False,
             csi_endpoint: str | None = None, csi_jwt_login=None,
             metrics_addr: str | None = None,
             reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL, broker: bool = False,
             inventory_interval: float = DEFAULT_INVENTORY_INTERVAL) -> list[Service]:
    """What the agent runs besides its health server. The opt-in services are imported only when
    asked for: grpc (CSI) and prometheus_client (metrics) cost an agent without them start-up time
    and memory."""
    write_budget.configure(config.vault_write_budget)  # every Vault write the agent makes, whoever asks
    if config.auth_role:
        # The agent logs in itself (service-account JWT) and keeps the token it gets alive.
        keeper: Service = GeneratorLogin(config, renew_interval)
    else:
        keeper = GeneratorRenewal(config, renew_interval)
    found = [keeper, RevocationRetry(config, retry_interval), ReconcileLoop(config, reconcile_interval),
             InventoryLoop(config, inventory_interval)]
    if broker:
        # The plain DaemonSet's default: the driver's calls make their Vault requests here (no mount
        # privilege needed: the driver still mounts itself).
        from .broker_server import BrokerServer

        found.append(BrokerServer(config))
    if relay:
        # Opt-in: the agent then mounts for the kubelet, so it needs privileges and mount propagation.
        from .relay_server import RelayServer

        found.append(RelayServer(config))
    if csi_endpoint:
        # Opt-in too, same needs.
        from .csi_server import CsiServer

        found.append(CsiServer(config, csi_endpoint, jwt_login=csi_jwt_login))
    if metrics_addr:  # last: it reports on the services above
        from .metrics import MetricsServer

        found.append(MetricsServer(config, metrics_addr, found))
    return found


class Agent:
    def __init__(self, services: list[Service], health_addr: str | None = DEFAULT_HEALTH_ADDR,
                 settings: dict[str, Any] | None = None):
        self.services = list(services)
        self.settings = settings  # reported so `vaulttmpfs doctor` can compare them with the driver's
        self.health = HealthServer(health_addr, self.report) if health_addr else None
        self.stopping = threading.Event()
        self.started = threading.Event()  # every service started: the health server answers before that

    def report(self) -> tuple[bool, bool, dict]:
        statuses = {s.name: s.status() for s in self.services}
        # A service not yet started reports healthy (nothing has failed), but it serves nothing yet.
        healthy = self.started.is_set() and all(s.healthy() for s in self.services)
        alive = all(s.alive() for s in self.services) and not self.stopping.is_set()
        body: dict[str, Any] = {"services": statuses}
        if not self.started.is_set():
            body["starting"] = True
        if self.settings is not None:
            body["settings"] = self.settings
        return healthy, alive, body

    def run(self, handle_signals: bool = True) -> None:
        """Start everything, wait for SIGTERM/SIGINT (or `stopping`), stop everything."""
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.stopping.set())
            signal.signal(signal.SIGHUP, lambda *_: log.reopen())  # logrotate's postrotate
        started: list[Service] = []
        import_vault_stack()
        try:
            for service in ([self.health] if self.health else []) + self.services:
                service.start()
                started.append(service)
            self.started.set()
            while not self.stopping.wait(1.0):  # a timed wait lets signal handlers run promptly
                pass
        finally:
            for service in reversed(started):
                service.stop()
            for service in started:
                if isinstance(service, Loop):
                    service.join(timeout=5)


def import_vault_stack() -> None:
    """Import what a Vault call imports, here in the main thread before any service starts. hvac's
    modules import each other; two services' threads importing it for the first time at once got
    `_DeadlockError` from importlib (seen: the relay's start against the generator renewal's first
    call). Paid once at start, not on the first pod's mount. vault.client first: it quiets requests'
    import warning."""
    # isort: off
    from ..vault import client  # noqa: F401
    from ..engine import operation  # noqa: F401
    import hvac.exceptions  # noqa: F401
    import requests  # noqa: F401
    # isort: on
