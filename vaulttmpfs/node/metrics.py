"""The agent's GET /metrics (Prometheus text format, prometheus-client).

Counted here: every mount/unmount (by verb, front end, path -- the driver on its own or relayed
through the agent --, outcome and a reason from a fixed set), their durations, each Vault round
trip's duration, relay connections and fallbacks, and from the node's state at scrape time:
pending revocations (apart: those a rotation keeps for its grace), volumes held, the generator
token's remaining TTL and last renewal result.
Driver processes spool their records in the state dir (see telemetry); they are folded in before
every scrape and every FOLD_INTERVAL, so calls made without the agent are counted too.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import log, telemetry
from ..config import Config
from ..engine import intents, rotate
from ..engine.state import StateStore
from ..vault import write_budget
from .httpd import serve_http
from .service import Family, Loop

FOLD_INTERVAL = 15.0
FRONT_ENDS = ("flexvolume", "csi")  # label values are a fixed set, whatever a spool line says
VIAS = ("driver", "relay", "agent")
CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
VAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# From owed to revoked: a revoke call (ms), or a queued one retried once Vault is back (minutes, hours).
REVOKE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


class Metrics:
    """The counters and histograms; `telemetry`'s sink inside the agent."""

    def __init__(self, registry):
        self.lock = threading.Lock()
        self.operations = Counter("vaulttmpfs_volume_operations", "Volume calls (mount/unmount) by outcome",
                                  ["verb", "front_end", "via", "outcome", "reason"], registry=registry)
        self.durations = Histogram("vaulttmpfs_volume_operation_duration_seconds", "Duration of volume calls",
                                   ["verb", "front_end", "via"], buckets=CALL_BUCKETS, registry=registry)
        self.vault = Histogram("vaulttmpfs_vault_request_duration_seconds", "Duration of Vault round trips",
                               ["call", "outcome"], buckets=VAULT_BUCKETS, registry=registry)
        self.fallbacks = Counter("vaulttmpfs_relay_fallbacks",
                                 "Driver calls that found the relay socket but no agent, and did the work themselves",
                                 registry=registry)
        self.revocations = Histogram("vaulttmpfs_revocation_latency_seconds",
                                     "Seconds from a token (a pod's, or its wrapping token) being owed "
                                     "revocation (unmount, reconcile) to revoked: the revoke call, or since "
                                     "it was queued", buckets=REVOKE_BUCKETS,
                                     registry=registry)
        self.rate_limited = Counter("vaulttmpfs_vault_rate_limited",
                                    "Vault answers 429 (a rate-limit quota), whether a retry then got through or not",
                                    ["call"], registry=registry)
        self.spooled = Counter("vaulttmpfs_spooled_records", "Records folded in from driver processes",
                               registry=registry)

    def call(self, record: dict[str, Any]) -> None:
        reason = record.get("reason") if record.get("reason") in telemetry.REASONS else "internal"
        verb = record.get("verb") if record.get("verb") in ("mount", "unmount") else "other"
        front_end = record.get("front_end") if record.get("front_end") in FRONT_ENDS else "other"
        via = record.get("via") if record.get("via") in VIAS else "other"
        labels = (verb, front_end, via)
        outcome = "success" if record.get("outcome") == "success" else "failure"
        self.operations.labels(*labels, outcome, reason).inc()
        self.durations.labels(*labels).observe(float(record.get("seconds") or 0))
        for entry in record.get("vault") or []:
            if isinstance(entry, list) and len(entry) == 3:
                self.vault_call(str(entry[0]), float(entry[1]), bool(entry[2]))
        for seconds in record.get("revocations") or []:
            self.revocation(float(seconds))
        for kind in record.get("throttled") or []:
            self.rate_limited_call(str(kind))
        if record.get("relay") == "fallback":
            self.fallbacks.inc()

    def revocation(self, seconds: float) -> None:
        self.revocations.observe(max(0.0, seconds))

    def rate_limited_call(self, kind: str) -> None:
        self.rate_limited.labels(kind if kind in set(telemetry.VAULT_CALLS.values()) else "other").inc()

    def vault_call(self, kind: str, seconds: float, ok: bool) -> None:
        kind = kind if kind in set(telemetry.VAULT_CALLS.values()) | {"other"} else "other"
        self.vault.labels(kind, "ok" if ok else "error").observe(seconds)


class NodeState:
    """Gauges read at scrape time from the state dir, and each service's own families (`Service.metrics`)."""

    def __init__(self, config: Config, services: list):
        self.config = config
        self.services = services

    def describe(self):
        return []

    def collect(self):
        store = StateStore(self.config.state_dir)
        queue = store.list_pending()
        waiting = sum(rotate.held_back(p) for p in queue)  # a rotation's grace: not owed yet, not alerted on
        yield GaugeMetricFamily("vaulttmpfs_pending_revocations", "Tokens owed revocation that Vault has not "
                                "taken yet (the agent retries them)", value=len(queue) - waiting)
        yield GaugeMetricFamily("vaulttmpfs_rotation_revocations_waiting", "Old tokens a rotation keeps until the "
                                "pod takes its new one or the grace ends (and a rotation's new ones while it runs)",
                                value=waiting)
        yield GaugeMetricFamily("vaulttmpfs_volumes", "Volumes this node holds (state records)",
                                value=len(store.list_volumes()))
        unrecorded = intents.summary(store)
        yield GaugeMetricFamily("vaulttmpfs_unrecorded_tokens", "Token creates whose answer was lost after Vault may "
                                "have acted: tokens that may be alive, accessor unknown", value=unrecorded["count"])
        yield GaugeMetricFamily("vaulttmpfs_unrecorded_tokens_alive_until_seconds", "Unix time by which every "
                                "such token has expired (0: none)", value=unrecorded["until"] or 0)
        budget = write_budget.current()
        if budget:
            yield GaugeMetricFamily("vaulttmpfs_vault_write_budget", "Vault writes this agent lets be in flight at "
                                    "once (VAULTTMPFS_VAULT_WRITE_BUDGET)", value=budget.size)
            yield GaugeMetricFamily("vaulttmpfs_vault_writes_in_flight", "Vault writes in flight now",
                                    value=budget.in_flight)
            yield GaugeMetricFamily("vaulttmpfs_vault_writes_in_flight_peak", "The most Vault writes in flight at "
                                    "once since the agent started", value=budget.peak)
            yield CounterMetricFamily("vaulttmpfs_vault_write_budget_waits", "Vault writes that waited for a slot",
                                      value=budget.waited)
            yield CounterMetricFamily("vaulttmpfs_vault_write_budget_refusals", "Vault writes that found no slot "
                                      "within their deadline", value=budget.refused)
        for service in self.services:
            for family in service.metric_families():
                yield prometheus_family(family)


def prometheus_family(family: Family):
    made = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}[family.kind]
    if not family.labels:
        return made(family.name, family.help, value=family.samples[0][1])
    result = made(family.name, family.help, labels=list(family.labels))
    for labels, value in family.samples:
        result.add_metric(list(labels), value)
    return result


class MetricsServer(Loop):
    """Serves /metrics and folds the driver processes' spool every FOLD_INTERVAL."""

    name = "metrics"

    def __init__(self, config: Config, addr: str, services: list):
        super().__init__()
        self.config = config
        self.addr = addr
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.registry.register(NodeState(config, services))
        self._fold_lock = threading.Lock()
        self._server = None
        self.folded = 0

    def fold(self) -> None:
        with self._fold_lock:
            records = telemetry.fold(self.config.state_dir)
            for record in records:
                try:
                    self.metrics.call(record)
                except (TypeError, ValueError):  # a garbled line costs that line, not the scrape
                    continue
            self.metrics.spooled.inc(len(records))
            self.folded += len(records)

    def run_once(self) -> float:
        self.fold()
        return FOLD_INTERVAL

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "try /metrics")
                    return
                try:
                    server.fold()
                except OSError as exc:
                    log.get().warning("metrics spool fold failed", error=str(exc))
                data = generate_latest(server.registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args):
                pass

        self._server, _thread = serve_http(self.addr, Handler, "metrics server")
        telemetry.set_sink(self.metrics)
        super().start()

    def stop(self) -> None:
        super().stop()
        telemetry.set_sink(None)
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def status(self) -> dict[str, Any]:
        return {"addr": self.addr, "folded": self.folded}
