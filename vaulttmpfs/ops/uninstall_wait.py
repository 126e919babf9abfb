"""`vaulttmpfs uninstall --wait`: the uninstall variant's main container, in the agent's place.

It tries `uninstall` every interval until it succeeds, then idles until SIGTERM (a DaemonSet's
container must not exit). Meanwhile it serves what the pods holding the uninstall up need to go:

- with a CSI endpoint, the CSI node plugin, teardown only (servicers.TeardownOnly): the kubelet
  tears a CSI volume down only through it, and the agent this replaces was its only server, so
  without it a deleted pod stayed Terminating, its token alive, and uninstall refused for ever;
- the generator token, renewed (never logged in anew: uninstall is about to revoke it), which the
  revocation of each pod token at its unmount or unpublish needs;
- with a health address, /healthz: 200 once uninstalled (the DaemonSet's readiness: Ready means
  done), else 503 with the last refusal; /livez: 200 while it runs.

Everything is imported before the first attempt: run from the installed driver, uninstall deletes
the very bundle this process runs from.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..config import Config
from ..errors import DriverError
from . import uninstall as remover

DEFAULT_INTERVAL = 10.0


class UninstallWait:
    def __init__(self, config: Config, plugin_dir: str, revoke: bool = True, interval: float = DEFAULT_INTERVAL,
                 csi_endpoint: str | None = None, health_addr: str | None = None):
        from ..node.agent import import_vault_stack
        from ..node.generator_renewal import GeneratorRenewal
        from ..node.health import HealthServer

        import_vault_stack()  # before any service thread runs a Vault call (see there)
        self.config, self.plugin_dir, self.revoke, self.interval = config, plugin_dir, revoke, interval
        self.renewal = GeneratorRenewal(config)
        self.csi = _teardown_server(config, csi_endpoint) if csi_endpoint else None
        self.health = HealthServer(health_addr, self.report) if health_addr else None
        self.state: dict[str, Any] = {"uninstalled": False, "attempts": 0, "last_refusal": None}

    def report(self) -> tuple[bool, bool, dict]:
        """(healthy, alive, body) for /healthz and /livez."""
        services = [s for s in (self.renewal, self.csi) if s]
        alive = self.csi.alive() if self.csi else True  # the renewal ends with the token: not a failure
        return self.state["uninstalled"], alive, {"uninstall": dict(self.state),
                                                  "services": {s.name: s.status() for s in services}}

    def run(self, stopping: threading.Event, say: Callable[[str, bool], None]) -> None:
        """say(line, refused): what each attempt came to."""
        started = []
        try:
            for service in (s for s in (self.health, self.renewal, self.csi) if s):
                service.start()
                started.append(service)
            while not self._attempt(say) and not stopping.wait(self.interval):
                pass
            self.renewal.stop()  # revoked (or kept for a reinstall): either way nothing left to do here
            stopping.wait()
        finally:
            for service in reversed(started):
                service.stop()

    def _attempt(self, say: Callable[[str, bool], None]) -> bool:
        self.state["attempts"] += 1
        try:
            result = remover.uninstall(self.config, self.plugin_dir, self.revoke, serving_csi=self.csi is not None)
        except (DriverError, OSError) as exc:
            self.state["last_refusal"] = str(exc)
            say(f"not uninstalled yet: {exc} (trying again every {self.interval:g}s)", True)
            return False
        self.state.update(uninstalled=True, last_refusal=None)
        for line in remover.summary(result):
            say(line, False)
        return True


def _teardown_server(config: Config, endpoint: str):
    from ..csi import servicers
    from ..node.csi_server import CsiServer

    return CsiServer(config, endpoint, node=servicers.TeardownOnly(config))
