"""The node agent (`vaulttmpfs agent`) against real OpenBao: generator token renewal, revocation
retries, health, and a clean stop that leaves mounted volumes alone.

Runs from the source tree and from the PyInstaller build (the DaemonSet runs the build).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from itertools import pairwise

import pytest

from .agents import AgentProcess
from .conftest import driver_env, generator_file, on_source_and_build, remember_secret
from .faultserver import FaultServer
from .kubelet import Kubelet, is_mount_point
from .vaultserver import REPO, closed_addr

NGINX = {"vault/policies": "nginx"}
RENEW_SELF = "/v1/auth/token/renew-self"


def test_renews_a_periodic_generator_token_past_its_period(bao, tmp_path, log_dir):
    on_source_and_build(lambda kind, driver_cmd: renews_past_its_period(bao, driver_cmd, tmp_path / kind, log_dir))


def renews_past_its_period(bao, driver_cmd, tmp_path, log_dir):
    period = 4
    tmp_path.mkdir()
    token_path = tmp_path / "vaulttoken"
    auth = generator_file(bao, token_path, ttl="", period=f"{period}s")
    env = driver_env(bao, {"path": str(token_path)}, tmp_path, log_dir)
    ttls = []
    with AgentProcess(driver_cmd, env, "--retry-interval", "1h") as agent:
        body = agent.wait_for(lambda s, b: s == 200, "a first renewal")
        generator = body["services"]["generator"]
        assert generator["lease_duration"] == period
        assert generator["renew_interval"] == period / 2  # default: half the token's period
        started = time.monotonic()
        while time.monotonic() - started < 2.5 * period:  # without renewals it would be gone by now
            info = bao.lookup_accessor(auth["accessor"])
            assert info is not None, f"generator token expired; ttls seen: {ttls}"
            ttls.append(info["ttl"])
            time.sleep(0.5)
        status, body, raw = agent.get()
        assert status == 200
        assert body["services"]["generator"]["renewals"] >= 3
        assert auth["client_token"].encode() not in raw
        assert agent.terminate() == 0
    assert any(later > earlier for earlier, later in pairwise(ttls)), ttls  # the TTL went back up


def test_explicit_renew_interval(bao, driver_cmd, tmp_path, log_dir):
    token_path = tmp_path / "vaulttoken"
    auth = generator_file(bao, token_path, ttl="", period="1h")
    env = driver_env(bao, {"path": str(token_path)}, tmp_path, log_dir, VAULTTMPFS_RENEW_INTERVAL="1s")
    with AgentProcess(driver_cmd, env) as agent:
        body = agent.wait_for(lambda s, b: s == 200 and b["services"]["generator"]["renewals"] >= 3,
                              "three renewals a second apart")
        assert body["services"]["generator"]["renew_interval"] == 1
        assert body["services"]["generator"]["lease_duration"] == 3600
        assert agent.terminate() == 0
    assert bao.lookup_accessor(auth["accessor"])["ttl"] > 3500


def test_a_renew_interval_longer_than_the_lease_gives_way_to_half_the_lease(bao, tmp_path, log_dir):
    """VAULTTMPFS_RENEW_INTERVAL=10s with a 4 s periodic token: the agent waited 10 s, the token was
    gone at 4 s, and every mount after it was refused (403)."""
    on_source_and_build(lambda kind, driver_cmd: interval_gives_way(bao, driver_cmd, tmp_path / kind, log_dir))


def interval_gives_way(bao, driver_cmd, tmp_path, log_dir):
    period = 4
    tmp_path.mkdir()
    token_path = tmp_path / "vaulttoken"
    auth = generator_file(bao, token_path, ttl="", period=f"{period}s")
    env = driver_env(bao, {"path": str(token_path)}, tmp_path, log_dir, VAULTTMPFS_RENEW_INTERVAL="10s")
    with AgentProcess(driver_cmd, env, "--retry-interval", "1h") as agent:
        agent.wait_for(lambda s, b: s == 200, "a first renewal")
        started = time.monotonic()
        while time.monotonic() - started < 2.5 * period:  # past the 10 s the interval asked for
            assert bao.lookup_accessor(auth["accessor"]) is not None, "the generator token expired"
            time.sleep(0.5)
        generator = agent.get()[1]["services"]["generator"]
        assert generator["renew_interval"] == period / 2 and generator["renewals"] >= 3
        [warned] = agent.events("renew interval longer than half the generator token's lease: "
                                "renewing at half the lease instead")  # once, not at every renewal
        assert (warned["renew_interval"], warned["lease_duration"]) == (10, period)
        node = Kubelet(driver_cmd, env, tmp_path)
        reply, path = node.mount(node.new_pod(), NGINX)
        assert reply.ok, reply.body
        assert node.unmount(path).ok
        assert agent.terminate() == 0


def test_a_failed_renewal_is_retried_before_a_short_lease_runs_out(bao, tmp_path, log_dir):
    """A renewal that failed (Vault answering 503) was retried 10 s later: a 4 s periodic token
    had expired by then, for good."""
    on_source_and_build(lambda kind, driver_cmd: retried_in_time(bao, driver_cmd, tmp_path / kind, log_dir))


def retried_in_time(bao, driver_cmd, tmp_path, log_dir):
    period = 4
    tmp_path.mkdir()
    token_path = tmp_path / "vaulttoken"
    auth = generator_file(bao, token_path, ttl="", period=f"{period}s")
    with FaultServer(bao.addr) as fault:
        env = driver_env(bao, {"path": str(token_path)}, tmp_path, log_dir, VAULT_ADDR=fault.addr)
        with AgentProcess(driver_cmd, env, "--retry-interval", "1h") as agent:
            agent.wait_for(lambda s, b: s == 200, "a first renewal")
            fault.add(RENEW_SELF, "error", times=2, status=503)  # the call and its one retry (VAULT_MAX_RETRIES)
            agent.wait_for(lambda s, b: b["services"]["generator"]["failures"] == 1, "a failed renewal")
            started = time.monotonic()
            while time.monotonic() - started < 2.5 * period:
                assert bao.lookup_accessor(auth["accessor"]) is not None, "the generator token expired"
                time.sleep(0.5)
            status, body, _ = agent.get()
            assert status == 200 and body["services"]["generator"]["last_error"] is None
            assert agent.terminate() == 0


def test_health_is_503_with_a_revoked_token_and_recovers_after_a_new_one(bao, driver_cmd, tmp_path, log_dir):
    token_path = tmp_path / "vaulttoken"
    dead = generator_file(bao, token_path, ttl="1h")
    bao.revoke_token(dead["client_token"])
    env = driver_env(bao, {"path": str(token_path)}, tmp_path, log_dir, VAULTTMPFS_RENEW_INTERVAL="1s")
    with AgentProcess(driver_cmd, env) as agent:
        body = agent.wait_for(lambda s, b: "last_failure" in b["services"]["generator"], "a failed renewal")
        assert body["status"] == "failing" and agent.get()[0] == 503
        assert "permission denied" in body["services"]["generator"]["last_error"]
        assert body["services"]["generator"]["valid"] is False
        status, live, raw = agent.get("/livez")
        assert status == 200 and live["status"] == "ok"  # alive: restarting would not fix the token
        assert dead["client_token"].encode() not in raw

        fresh = generator_file(bao, tmp_path / "new-token", ttl="1h")  # a re-bootstrap replaces the file
        os.replace(tmp_path / "new-token", token_path)
        body = agent.wait_for(lambda s, b: s == 200, "the new token to be renewed")
        assert body["services"]["generator"]["last_error"] is None
        _, _, raw = agent.get()
        assert fresh["client_token"].encode() not in raw
        assert agent.get("/nope")[0] == 404
        assert agent.terminate() == 0


def test_missing_generator_token_is_reported_not_fatal(bao, driver_cmd, tmp_path, log_dir):
    env = driver_env(bao, {"path": str(tmp_path / "absent")}, tmp_path, log_dir)
    with AgentProcess(driver_cmd, env) as agent:
        body = agent.wait_for(lambda s, b: "last_failure" in b["services"]["generator"], "a failed renewal")
        assert agent.get()[0] == 503
        assert "vaulttmpfs bootstrap" in body["services"]["generator"]["last_error"]
        assert agent.terminate() == 0


def test_retries_revocations_queued_while_vault_was_down(kubelet, bao, driver_cmd, log_dir):
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    wrap_info = json.loads((path / "vault-token.json").read_text())
    accessor = wrap_info["wrapped_accessor"]
    remember_secret((path / "vault-token").read_text())
    down = {**kubelet.env, "VAULT_ADDR": closed_addr()}
    reply = kubelet.call("unmount", str(path), env=down)
    assert reply.ok and "queued" in reply.message, reply.body
    pending = kubelet.root / "state" / "pending"
    assert len(list(pending.glob("*.json"))) == 2  # the pod token and its wrapping token

    # While Vault is still unreachable the agent retries and keeps the queue.
    with AgentProcess(driver_cmd, down, "--retry-interval", "1s") as agent:
        body = agent.wait_for(lambda s, b: (b["services"]["revocations"]["pending"] or 0) >= 2,
                              "a failed retry round")
        assert body["services"]["revocations"]["revoked"] == 0
        assert agent.terminate() == 0
    assert len(list(pending.glob("*.json"))) == 2
    assert bao.lookup_accessor(accessor) is not None

    # Vault is back: the next agent round revokes them.
    with AgentProcess(driver_cmd, kubelet.env, "--retry-interval", "1s") as agent:
        body = agent.wait_for(lambda s, b: b["services"]["revocations"]["revoked"] >= 2, "the revocations")
        assert body["services"]["revocations"]["pending"] == 0
        assert agent.terminate() == 0
    assert bao.lookup_accessor(accessor) is None
    assert bao.lookup_accessor(wrap_info["accessor"]) is None
    assert list(pending.glob("*.json")) == []


def test_stopping_the_agent_leaves_mounted_volumes_working(kubelet, bao, driver_cmd):
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    files = {name: (path / name).read_bytes() for name in os.listdir(path)}
    remember_secret(files["vault-token"].decode())
    accessor = json.loads(files["vault-token.json"])["wrapped_accessor"]

    with AgentProcess(driver_cmd, kubelet.env, "--retry-interval", "1s") as agent:
        agent.wait_for(lambda s, b: s == 200, "the agent to be healthy")
        assert agent.terminate() == 0
        with pytest.raises(OSError):
            agent.get()  # the health server is gone with it

    assert is_mount_point(path)
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == files
    assert bao.lookup_accessor(accessor) is not None
    reply = kubelet.unmount(path)  # no agent running
    assert reply.ok and "revoked" in reply.message, reply.body
    assert not is_mount_point(path)
    assert bao.lookup_accessor(accessor) is None


def test_health_port_in_use_fails_fast_with_a_clear_error(bao, driver_cmd, tmp_path, log_dir):
    import socket

    env = driver_env(bao, {"path": str(tmp_path / "absent")}, tmp_path, log_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([*driver_cmd, "agent", "--health-addr", f"127.0.0.1:{port}"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr and "health server cannot listen" in proc.stderr


def test_the_vault_stack_is_imported_before_any_service_starts(tmp_path):
    """hvac's modules import each other: two services' threads importing it for the first time at once
    got importlib's _DeadlockError and the agent died at start (seen in a full run: the relay's start
    against the generator renewal's first call). So the agent imports it in its main thread first."""
    seen = run_agent_probe(
        tmp_path,
        "import sys, threading\n"
        "from vaulttmpfs.node.agent import Agent\n"
        "from vaulttmpfs.node.service import Service\n"
        "seen = []\n"
        "class Probe(Service):\n"
        "    def start(self):\n"
        "        seen.append('hvac.exceptions' in sys.modules and 'requests' in sys.modules)\n"
        "        agent.stopping.set()\n"
        "agent = Agent([Probe()], health_addr=None)\n"
        "assert 'hvac' not in sys.modules\n"
        "agent.run(handle_signals=False)\n"
        "print(seen)\n")
    assert seen == "[True]"


def test_the_agent_is_not_ready_until_every_service_has_started(tmp_path):
    """The health server starts first, so /healthz answered 200 while the broker, the loops and the
    metrics server were still starting (a service not started has nothing failed): a readiness probe
    or `doctor` saw a ready agent with no broker socket yet (and a test counting the agent's threads
    took its count too early)."""
    seen = run_agent_probe(
        tmp_path,
        "import threading\n"
        "from vaulttmpfs.node.agent import Agent\n"
        "from vaulttmpfs.node.service import Service\n"
        "seen = []\n"
        "class Probe(Service):\n"
        "    def start(self):\n"
        "        healthy, _alive, body = agent.report()\n"
        "        seen.append((healthy, body.get('starting')))\n"
        "        threading.Timer(0.5, self.after).start()\n"
        "    def after(self):\n"
        "        healthy, _alive, body = agent.report()\n"
        "        seen.append((healthy, body.get('starting')))\n"
        "        agent.stopping.set()\n"
        "agent = Agent([Service(), Probe(), Service()], health_addr=None)\n"
        "agent.run(handle_signals=False)\n"
        "print(seen)\n")
    assert seen == "[(False, True), (True, None)]"


def run_agent_probe(tmp_path, script: str) -> str:
    """Run `script` (an Agent driven by probe services) in a fresh interpreter; what it printed."""
    probe = tmp_path / "probe.py"
    probe.write_text(script)
    proc = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()
