"""`vaulttmpfs agent` as a child process, for the tests: its health endpoint, its relay socket,
its log lines and its /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from vaulttmpfs.flexvolume import broker, relay

from .vaultserver import dies_with_parent, free_port, stop_process


class AgentProcess:
    """`vaulttmpfs agent ARGS` in a session of its own, with its health endpoint on a free loopback
    port (`get`, `wait_for`). `relaying()` starts it as the relay DaemonSet runs it instead."""

    def __init__(self, driver_cmd: list[str], env: dict[str, str], *args: str, log_file: Path | None = None,
                 wrap: list[str] | None = None, health: bool = True):
        self.port = free_port() if health else None
        self.log_file = log_file or Path(env["VAULTTMPFS_LOG_FILE"])
        self.socket_path = env.get("VAULTTMPFS_AGENT_SOCKET")
        health_addr = f"127.0.0.1:{self.port}" if health else ""
        self.proc = subprocess.Popen(
            [*(wrap or []), *driver_cmd, "agent", "--health-addr", health_addr, *args],
            env={**env, "VAULTTMPFS_LOG_FILE": str(self.log_file)}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=dies_with_parent(),
        )

    @classmethod
    def relaying(cls, driver_cmd: list[str], env: dict[str, str], log_file: Path,
                 wrap: list[str] | None = None) -> AgentProcess:
        """`agent --relay` with no health port, once its socket answers with the banner."""
        agent = cls(driver_cmd, env, "--relay", "--retry-interval", "1h", log_file=log_file, wrap=wrap, health=False)
        agent.wait_ready()
        return agent

    @classmethod
    def brokering(cls, driver_cmd: list[str], env: dict[str, str], log_file: Path | None = None,
                  health: bool = True) -> AgentProcess:
        """`agent --broker` (the plain DaemonSet's), once its broker socket answers with the banner."""
        agent = cls(driver_cmd, env, "--broker", "--retry-interval", "1h", log_file=log_file, health=health)
        agent.socket_path = env["VAULTTMPFS_BROKER_SOCKET"]
        agent.wait_ready(banner=broker.BANNER)
        return agent

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # --- health endpoint

    def get(self, path: str = "/healthz") -> tuple[int, dict, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        return status, json.loads(raw), raw

    def wait_for(self, predicate, what: str, timeout: float = 40.0) -> dict:
        """Poll /healthz until predicate(status, body) holds (bounded: a generous limit, not a speed test)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_running()
            try:
                status, body, _ = self.get()
                last = (status, body)
                if predicate(status, body):
                    return body
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last health answer: {last}")

    # --- relay socket and log

    def wait_ready(self, timeout: float = 60.0, banner: bytes = relay.BANNER) -> None:
        """Until the relay socket answers with the banner (bounded: a generous limit, not a speed test)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(2)
                    sock.connect(self.socket_path)
                    if sock.recv(64) == banner:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the agent's relay socket did not answer")

    def events(self, event: str) -> list[dict]:
        if not self.log_file.exists():
            return []
        lines = (json.loads(line) for line in self.log_file.read_text().splitlines() if line.strip())
        return [line for line in lines if line.get("event") == event]

    def relayed(self, verb: str | None = None) -> list[dict]:
        return [e for e in self.events("relayed") if verb is None or e["verb"] == verb]

    def wait_for_event(self, event: str, count: int = 1, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(event)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} in the agent's log within {timeout}s")

    # --- stopping

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
        stop_process(self.proc, grace=60)
        return self.proc.returncode

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}: {self.proc.stdout.read()!r}")


def scrape(port: int) -> dict[tuple, float]:
    """An agent's /metrics: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
