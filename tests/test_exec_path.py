"""What a kubelet call loads and reads: the real entry, run in a fresh interpreter per call (the
exec's start-up is its cost), against real OpenBao and real tmpfs."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from .agents import AgentProcess
from .conftest import driver_env, write_config
from .kubelet import Kubelet
from .vaultserver import REPO

PROBE = [sys.executable, str(REPO / "tests" / "exec_probe.py")]
BARE_PROBE = [sys.executable, "-S", str(REPO / "tests" / "exec_probe.py")]
NGINX = {"vault/policies": "nginx"}
# Never on a kubelet call: the agent's (grpc, protobuf, prometheus_client), the operator commands' (click),
# and every other front end of ours.
NEVER = ("grpc", "google.protobuf", "prometheus_client", "click", "vaulttmpfs.cli", "vaulttmpfs.node",
         "vaulttmpfs.csi", "vaulttmpfs.ops", "vaulttmpfs.pod")
# What `init` loads on top of the interpreter's own start: nothing but its answer (it runs on every probe).
INIT_LOADS = {"vaulttmpfs", "vaulttmpfs.entry", "vaulttmpfs.errors", "vaulttmpfs.flexvolume",
              "vaulttmpfs.flexvolume.protocol"}
# A relayed call hands over and passes the answer on: the relay client (on _socket, not socket), no
# settings, no Vault client.
RELAYED_LOADS = INIT_LOADS | {"vaulttmpfs.flexvolume.relay", "_socket"}


class ProbedNode(Kubelet):
    """The kubelet stand-in, exec'ing the driver through tests/exec_probe.py."""

    def __init__(self, env: dict[str, str], root: Path, report: Path):
        super().__init__([*PROBE, str(report)], env, root)
        self.report = report

    def last(self) -> dict:
        return ast.literal_eval(self.report.read_text())


def loaded(report: dict, *packages: str) -> list[str]:
    return [m for m in report["after"] if any(m == p or m.startswith(p + ".") for p in packages)]


@pytest.fixture
def probed(bao, generator, tmp_path, log_dir) -> ProbedNode:
    root = tmp_path / "node"
    root.mkdir()
    env = driver_env(bao, generator, root, log_dir)
    write_config(Path(env["VAULTTMPFS_CONFIG_FILE"]), {"VAULTTMPFS_TMPFS_SIZE": "1m"})
    return ProbedNode(env, root, tmp_path / "report")


@pytest.fixture
def bare(probed) -> ProbedNode:
    """The same node, its calls probed in an interpreter started without site (`python -S`, as the bundle
    starts): what the call loads is then all that is loaded. The brokered path needs the stdlib only."""
    probed.driver_cmd = [*BARE_PROBE, str(probed.report)]
    return probed


def test_init_loads_only_its_answer(probed):
    assert probed.init().ok
    report = probed.last()
    assert set(report["after"]) - set(report["before"]) == INIT_LOADS
    assert set(report["opened"]) <= {"/dev/null"}  # no settings read: only the streams silenced


@pytest.mark.parametrize("verb", ["mount", "unmount"])
def test_a_standalone_call_loads_no_agent_or_operator_code(probed, verb):
    reply, path = probed.mount(probed.new_pod(), NGINX)
    assert reply.ok, reply.body
    if verb == "unmount":
        assert probed.unmount(path).ok
    report = probed.last()
    if verb == "mount":
        assert probed.unmount(path).ok  # the pod's token revoked: none may outlive the suite
    assert loaded(report, *NEVER) == []
    # Standalone (no broker answers): the call does the Vault round trip itself, so hvac and its HTTP
    # stack load here, and only here; the log line is the stdlib's either way.
    assert loaded(report, "hvac", "requests", "urllib3")
    assert loaded(report, "structlog") == []
    # The policy bindings' YAML parser only when bindings are configured (they are not here).
    assert loaded(report, "yaml") == []


@pytest.mark.parametrize("verb", ["mount", "unmount"])
def test_a_call_reads_the_config_file_once(probed, verb):
    config_file = probed.env["VAULTTMPFS_CONFIG_FILE"]
    reply, path = probed.mount(probed.new_pod(), NGINX)
    assert reply.ok, reply.body
    if verb == "unmount":
        assert probed.unmount(path).ok
    opened = probed.last()["opened"]
    if verb == "mount":
        assert probed.unmount(path).ok  # the pod's token revoked: none may outlive the suite
    assert opened.count(config_file) == 1


def test_an_invalid_setting_is_the_answer_and_the_call_is_still_logged(probed):
    config_file = Path(probed.env["VAULTTMPFS_CONFIG_FILE"])
    write_config(config_file, {"VAULT_WRAP_TTL": "soon"})
    reply, path = probed.mount(probed.new_pod(), NGINX)
    assert reply.status == "Failure" and "VAULT_WRAP_TTL='soon'" in reply.message
    assert probed.last()["opened"].count(str(config_file)) == 1
    logged = [json.loads(line) for line in Path(probed.env["VAULTTMPFS_LOG_FILE"]).read_text().splitlines()]
    [line] = [line for line in logged if line["event"] == "driver call" and line["dir"] == str(path)]
    assert line["result"] == "Failure" and "VAULT_WRAP_TTL" in line["error"]


def test_a_relayed_call_loads_only_the_relay_client(probed, tmp_path, log_dir):
    probed.env["VAULTTMPFS_AGENT_SOCKET"] = str(tmp_path / "run" / "agent.sock")
    agent = AgentProcess.relaying([sys.executable, "-m", "vaulttmpfs"], probed.env,
                                  log_dir / f"{tmp_path.name}-agent.log")
    try:
        reply, path = probed.mount(probed.new_pod(), NGINX)
        assert reply.ok, reply.body
        assert len(agent.relayed("mount")) == 1
        report = probed.last()
        assert set(report["after"]) - set(report["before"]) == RELAYED_LOADS
        assert probed.env["VAULTTMPFS_CONFIG_FILE"] not in report["opened"]  # the agent reads the settings
        assert probed.unmount(path).ok
    finally:
        agent.stop()


# The brokered call (the plain DaemonSet's default): the agent makes the Vault calls, so no HTTP stack,
# no Vault client library and no structlog are loaded; the engine and the broker client (stdlib) are.
BROKERED_NEVER = (*NEVER, "hvac", "requests", "urllib3", "http.client", "ssl", "structlog", "yaml")
# Nor anything else it does not need (issue 25; docs/performance-flexvolume.md): the Vault client module
# and what it loads (random, signal, threading), hashlib (OpenSSL), dataclasses (inspect, ast, dis,
# tokenize), typing, json (re, enum), contextlib (collections, functools), socket, ctypes (its C half,
# _ctypes, is enough for mount(2)), and the engine's parts for the agent only. The standalone path may
# load them.
BROKERED_LEAN = ("vaulttmpfs.vault", "random", "signal", "threading", "hashlib", "_hashlib", "dataclasses", "inspect",
                 "ast", "dis", "tokenize", "typing", "json", "re", "enum", "contextlib", "collections", "functools",
                 "socket", "warnings", "ctypes", "vaulttmpfs.engine.rotate", "vaulttmpfs.engine.interfaces",
                 "vaulttmpfs.engine.bindings", "vaulttmpfs.engine.reconcile")


@pytest.mark.parametrize("verb", ["mount", "unmount"])
def test_a_brokered_call_loads_no_http_stack(bare, verb, tmp_path, log_dir):
    agent = AgentProcess.brokering([sys.executable, "-m", "vaulttmpfs"], bare.env,
                                   log_dir / f"{tmp_path.name}-agent.log", health=False)
    try:
        reply, path = bare.mount(bare.new_pod(), NGINX)
        assert reply.ok, reply.body
        report = bare.last()
        if verb == "unmount":
            assert bare.unmount(path).ok
            report = bare.last()
        else:
            assert bare.unmount(path).ok
        assert loaded(report, *BROKERED_NEVER) == []
        # Started without site (as the bundle is), so everything in sys.modules is the call's or the interpreter's.
        assert loaded(report, *BROKERED_LEAN) == []
        if verb == "unmount":  # what only a mount uses: the options' attributes, the note of a create
            assert loaded(report, "vaulttmpfs.engine.attributes", "vaulttmpfs.engine.intents") == []
        assert {"vaulttmpfs.flexvolume.broker", "vaulttmpfs.engine.operation", "vaulttmpfs.jsonlite", "_json",
                "_sha256"} <= set(report["after"]) - set(report["before"])
        calls = [json.loads(line) for line in Path(bare.env["VAULTTMPFS_LOG_FILE"]).read_text().splitlines()
                 if '"driver call"' in line]
        assert [c["vault"] for c in calls[-2:]] == ["broker", "broker"]
    finally:
        agent.stop()


def test_a_standalone_call_may_load_what_a_brokered_one_does_not(probed):
    """The fallback talks to Vault itself: hvac's client and the lean path's exclusions are its own."""
    reply, path = probed.mount(probed.new_pod(), NGINX)
    assert reply.ok, reply.body
    report = probed.last()
    assert probed.unmount(path).ok
    assert {"vaulttmpfs.vault.client", "hvac"} <= set(report["after"])
