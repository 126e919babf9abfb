"""The node agent: the long-running half of vaulttmpfs, next to the short-lived driver calls.

It keeps the node's generator token alive, retries revocations that unmount had to queue while
Vault was down, revokes the tokens of volumes whose pod is gone without an unmount (reconcile),
and answers health checks. It never touches a volume whose dir is there, so stopping it (or a
crash) leaves every mounted volume as it is; unmount works without it. The exception is opt-in: with
`--relay` it also serves the driver's fast path (see relay), mounting for the kubelet's calls.

Everything it runs is a `Service` (start/stop/status); `services()` lists them, so another one
(e.g. a local socket server) is one more entry there.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any, Callable

from .. import log
from ..config import Config
from ..errors import DriverError

DEFAULT_HEALTH_ADDR = "127.0.0.1:9829"
DEFAULT_RETRY_INTERVAL = 60.0
DEFAULT_RECONCILE_INTERVAL = 60.0
FAILURE_RETRY = 10.0  # after a failed renewal, try again this soon (or sooner if the interval is shorter)
NO_EXPIRY_RECHECK = 3600.0
MIN_INTERVAL = 1.0
MIN_RECONCILE_INTERVAL = 0.05  # a reconcile round is local (a listdir and an lstat per volume): cheap
RECENT_REVOCATIONS = 10


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


class GeneratorRenewal(Loop):
    """Renews the generator token: every `interval` seconds, or at half its lease when not set."""

    name = "generator"

    def __init__(self, config: Config, interval: float | None = None):
        super().__init__()
        self.config = config
        self.interval = interval
        self.state: dict[str, Any] = {"valid": False, "renewals": 0, "failures": 0, "last_error": "not renewed yet"}
        self._valid_until: float | None = None

    def run_once(self) -> float:
        from ..engine import generator

        logger = log.get(self.config.log_file, service=self.name)
        try:
            auth = generator.renew(self.config)
        except DriverError as exc:
            if "not renewable" not in str(exc):
                return self._failed(logger, str(exc))
            return self._not_renewable(logger, generator)
        except Exception as exc:  # noqa: BLE001 -- e.g. an odd answer from a proxy: report it, keep going
            logger.error("unexpected error renewing the generator token", exc_info=exc)
            return self._failed(logger, f"unexpected error: {type(exc).__name__}: {exc}")
        return self._renewed(logger, auth)

    def _renewed(self, logger, auth: dict[str, Any], event: str = "generator token renewed",
                 renewal: bool = True) -> float:
        lease = float(auth.get("lease_duration") or 0)
        next_in = self.interval or max(lease / 2, MIN_INTERVAL)
        self._valid_until = time.time() + lease if lease else None
        self.state.update(valid=True, renewals=self.state["renewals"] + renewal, last_error=None,
                          last_renewal=_iso(time.time()), lease_duration=lease, renew_interval=next_in,
                          policies=auth.get("policies") or [])
        logger.info(event, lease_duration=lease, next_in=next_in,
                    accessor=log.accessor_hint(auth.get("accessor")))  # any generator may revoke by accessor
        return next_in

    def _not_renewable(self, logger, generator) -> float:
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
        self.state.update(valid=still_valid, last_error=message, last_failure=_iso(time.time()),
                          failures=self.state["failures"] + 1)
        logger.warning("generator token renewal failed", error=message)
        return min(self.interval or FAILURE_RETRY, FAILURE_RETRY)

    def status(self) -> dict[str, Any]:
        expires_in = None if self._valid_until is None else max(0, round(self._valid_until - time.time()))
        return {**self.state, "expires_in": expires_in, "healthy": self.healthy()}

    def healthy(self) -> bool:
        if self.state["last_error"] is not None:
            return False
        return self._valid_until is None or time.time() < self._valid_until


class RevocationRetry(Loop):
    """Retries the revocations unmount queued while Vault was unreachable."""

    name = "revocations"

    def __init__(self, config: Config, interval: float = DEFAULT_RETRY_INTERVAL):
        super().__init__()
        self.config = config
        self.interval = interval
        self.state: dict[str, Any] = {"revoked": 0, "pending": None, "last_run": None, "last_error": None}

    def run_once(self) -> float:
        from ..engine import operation as driver

        try:
            result = driver.retry_pending(self.config)
        except (DriverError, OSError) as exc:
            self.state.update(last_error=str(exc), last_run=_iso(time.time()))
            log.get(self.config.log_file, service=self.name).warning("revocation retry failed", error=str(exc))
            return self.interval
        self.state.update(revoked=self.state["revoked"] + result["revoked"], pending=result["pending"],
                          last_run=_iso(time.time()), last_error=None)
        if result["revoked"] or result["pending"]:
            log.get(self.config.log_file, service=self.name).info("revocations retried", **result)
        return self.interval

    def status(self) -> dict[str, Any]:
        return dict(self.state)


class ReconcileLoop(Loop):
    """Revokes the tokens of volumes whose pod dir the kubelet removed without calling unmount."""

    name = "reconcile"
    min_interval = MIN_RECONCILE_INTERVAL

    def __init__(self, config: Config, interval: float = DEFAULT_RECONCILE_INTERVAL):
        super().__init__()
        self.config = config
        self.interval = interval
        self.state: dict[str, Any] = {"interval": interval, "rounds": 0, "revoked": 0, "queued": 0,
                                      "by_reason": {}, "volumes": None, "last_run": None, "last_error": None,
                                      "recent": []}

    def run_once(self) -> float:
        from ..engine import reconcile

        try:
            result = reconcile.reconcile(self.config)
        except (DriverError, OSError) as exc:
            self.state.update(last_error=str(exc), last_run=_iso(time.time()))
            log.get(self.config.log_file, service=self.name).warning("reconcile failed", error=str(exc))
            return self.interval
        self._count(result)
        return self.interval

    def _count(self, result: dict[str, Any]) -> None:
        state = self.state
        state["rounds"] += 1
        for done in result["volumes"]:
            if done["action"] in ("revoked", "queued"):
                state[done["action"]] += 1
                # Replaced, never changed in place: /healthz copies it from another thread.
                reason = done["reason"]
                state["by_reason"] = {**state["by_reason"], reason: state["by_reason"].get(reason, 0) + 1}
                recent = {k: done[k] for k in ("mount_dir", "pod_uid", "namespace", "pod", "action", "reason")}
                state["recent"] = ([{**recent, "round": state["rounds"], "at": _iso(time.time())}]
                                   + state["recent"])[:RECENT_REVOCATIONS]
        error = "; ".join(result["errors"]) or None
        if error and error != state["last_error"]:  # once per new error, not every round
            log.get(self.config.log_file, service=self.name).warning("reconcile incomplete", error=error)
        state.update(volumes=result["checked"], last_run=_iso(time.time()), last_error=error)

    def status(self) -> dict[str, Any]:
        return dict(self.state)


class HealthServer(Service):
    """GET /healthz: 200 when every service is healthy, else 503. GET /livez: 200 while loops run.

    The JSON body carries states and errors, never a token.
    """

    name = "health"

    def __init__(self, addr: str, report: Callable[[], tuple[bool, bool, dict]]):
        self.addr = addr
        self.report = report
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from http.server import BaseHTTPRequestHandler

        report = self.report

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's naming
                path = self.path.split("?", 1)[0]
                if path not in ("/healthz", "/livez"):
                    return self._send(404, {"error": "not found; try /healthz or /livez"})
                healthy, alive, body = report()
                ok = healthy if path == "/healthz" else alive
                self._send(200 if ok else 503, {"status": "ok" if ok else "failing", **body})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body, sort_keys=True).encode() + b"\n"
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args):  # probes every few seconds: not worth a log line each
                pass

        self._server, self._thread = serve_http(self.addr, Handler, "health server")

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())


# Probes and scrapes are one short request each. Connections beyond MAX_CONNECTIONS are closed at
# once, and any connection is cut after MAX_SECONDS, so idle or half-sent requests cannot pile up threads.
MAX_CONNECTIONS = 16
IDLE_SECONDS = 2.0
MAX_SECONDS = 5.0


def serve_http(addr: str, handler, what: str):
    """(server, thread): `handler` on host:port `addr`, connections bounded, served from a daemon thread."""
    from http.server import ThreadingHTTPServer

    host, port = parse_addr(addr)
    try:
        server = bounded_server(ThreadingHTTPServer, handler, (host, port))
    except OSError as exc:
        raise DriverError(f"{what} cannot listen on {addr}: {exc.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, args=(0.25,), name=what, daemon=True)
    thread.start()
    return server, thread


def bounded_server(base, handler, address):
    """`base` (a threading HTTP server) serving `handler` at `address`, with bounded connections."""
    import socket
    import time

    class Bounded(base):
        daemon_threads = True
        request_queue_size = 64  # a burst is accepted (and refused past the limit) rather than left in SYN

        def limits(self, max_connections: int, max_seconds: float) -> None:
            self._slots = threading.BoundedSemaphore(max_connections)
            self._max_seconds = max_seconds
            self._open: dict = {}
            self._open_lock = threading.Lock()

        def process_request(self, request, client_address):
            if not self._slots.acquire(blocking=False):
                self.shutdown_request(request)  # full: refuse rather than queue a thread
                return
            with self._open_lock:
                self._open[request] = time.monotonic()
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._done(request)
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._done(request)

        def _done(self, request) -> None:
            with self._open_lock:
                if self._open.pop(request, None) is None:
                    return
            self._slots.release()

        def service_actions(self) -> None:
            # Runs between polls of serve_forever: a connection past its time is cut (its thread's
            # read returns at once and the thread ends).
            now = time.monotonic()
            with self._open_lock:
                late = [conn for conn, since in self._open.items() if now - since > self._max_seconds]
            for conn in late:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    handler.timeout = IDLE_SECONDS  # per read: a silent connection is dropped this soon
    server = Bounded(address, handler)
    server.limits(MAX_CONNECTIONS, MAX_SECONDS)
    return server


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise DriverError(f"health address {addr!r} must be host:port (e.g. {DEFAULT_HEALTH_ADDR})")
    return host.strip("[]") or "0.0.0.0", int(port)


def services(config: Config, renew_interval: float | None = None,
             retry_interval: float = DEFAULT_RETRY_INTERVAL, relay: bool = False,
             csi_endpoint: str | None = None, csi_jwt_login=None,
             metrics_addr: str | None = None,
             reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL) -> list[Service]:
    """What the agent runs besides its health server."""
    if config.auth_role:
        # The agent logs in itself (service-account JWT) and keeps the token it gets alive.
        from .generator_login import GeneratorLogin

        keeper: Service = GeneratorLogin(config, renew_interval)
    else:
        keeper = GeneratorRenewal(config, renew_interval)
    found = [keeper, RevocationRetry(config, retry_interval), ReconcileLoop(config, reconcile_interval)]
    if relay:
        # Opt-in: the agent then mounts for the kubelet, so it needs privileges and mount propagation.
        from .relay_server import RelayServer

        found.append(RelayServer(config))
    if csi_endpoint:
        # Opt-in too, same needs; grpc is imported only here, never on the FlexVolume exec path.
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

    def report(self) -> tuple[bool, bool, dict]:
        statuses = {s.name: s.status() for s in self.services}
        healthy = all(s.healthy() for s in self.services)
        alive = all(s.alive() for s in self.services) and not self.stopping.is_set()
        body: dict[str, Any] = {"services": statuses}
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
        try:
            for service in ([self.health] if self.health else []) + self.services:
                service.start()
                started.append(service)
            while not self.stopping.wait(1.0):  # a timed wait lets signal handlers run promptly
                pass
        finally:
            for service in reversed(started):
                service.stop()
            for service in started:
                if isinstance(service, Loop):
                    service.join(timeout=5)


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
