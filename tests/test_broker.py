"""The plain DaemonSet's fast path: the driver call mounts, the node agent's broker makes its Vault calls.

Real OpenBao, real tmpfs, the driver exec'd as the kubelet does, the agent as `agent --broker`; the
kills are real kill -9s of the exec (and of the agent) at the step named.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from .agents import AgentProcess
from .conftest import driver_env
from .faultserver import CREATE, FaultServer, wait_for
from .kubelet import Kubelet, is_mount_point
from .vaultserver import closed_addr

NGINX = {"vault/policies": "nginx"}
STOP = "VAULTTMPFS_TEST_HOOK_STOP_AFTER_MINT"


class Node(Kubelet):
    def __init__(self, driver_cmd, env, root: Path):
        super().__init__(driver_cmd, env, root)
        self.journal = Path(env["VAULTTMPFS_STATE_DIR"]) / "broker"

    def start_mount(self, pod, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        """`mount` as the kubelet starts it, not waited for."""
        path = self.volume_dir(pod)
        opts = json.dumps(self.options(pod, "token", NGINX))
        proc = subprocess.Popen([*self.driver_cmd, "mount", str(path), opts], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or self.env)
        return proc, path

    def journalled(self) -> list[dict]:
        if not self.journal.is_dir():
            return []
        entries = []
        for name in os.listdir(self.journal):
            try:
                entries.append(json.loads((self.journal / name).read_text()))
            except (OSError, ValueError):
                pass  # being written
        return entries

    def intents(self) -> list[str]:
        """The creates whose token the node counts as possibly alive, unrecorded (engine.intents)."""
        return [p.read_text() for p in (Path(self.env["VAULTTMPFS_STATE_DIR"]) / "intents").glob("*.json")]

    def driver_calls(self) -> list[dict]:
        lines = Path(self.env["VAULTTMPFS_LOG_FILE"]).read_text().splitlines()
        return [json.loads(line) for line in lines if '"driver call"' in line]


def stopped_after_the_mint(proc: subprocess.Popen) -> bool:
    """The call stopped itself at the test hook: it holds the broker's answer and has written no record."""
    try:
        return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def token_accessor(path: Path) -> str:
    return json.loads((path / "vault-token.json").read_text())["wrapped_accessor"]


@pytest.fixture
def node(driver_cmd, bao, generator, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    return Node(driver_cmd, driver_env(bao, generator, root, log_dir, VAULTTMPFS_TMPFS_SIZE="1m"), root)


@pytest.fixture
def agent(node, driver_cmd):
    agent = AgentProcess.brokering(driver_cmd, node.env)
    yield agent
    agent.stop()


def node_behind(vault: FaultServer, driver_cmd, bao, generator, tmp_path, log_dir) -> tuple[Node, AgentProcess]:
    """A node whose driver and broker reach Vault through `vault` (a fault proxy), its agent brokering."""
    root = tmp_path / "node"
    root.mkdir()
    node = Node(driver_cmd, driver_env(bao, generator, root, log_dir, VAULT_ADDR=vault.addr,
                                       VAULT_CLIENT_TIMEOUT="30s"), root)
    return node, AgentProcess.brokering(driver_cmd, node.env)


def broker_status(agent) -> dict:
    return agent.get()[1]["services"]["broker"]


def test_a_brokered_mount_and_unmount(node, agent, bao):
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    accessor = token_accessor(path)
    assert bao.lookup_accessor(accessor)["policies"] == ["default", "nginx"]
    assert node.driver_calls()[-1]["vault"] == "broker"
    assert wait_for(lambda: not node.journalled())  # settled: the record owns the token
    assert bao.lookup_accessor(accessor)  # and it was not revoked by the settling
    assert broker_status(agent)["minted"] == 1
    assert node.unmount(path).ok
    assert bao.lookup_accessor(accessor) is None
    assert node.driver_calls()[-1]["vault"] == "broker"


def test_a_brokered_create_that_never_reached_vault_leaves_no_intent(node, agent):
    """The agent knows a create it could not send (connection refused) minted nothing: its answer says so,
    so the driver drops the create's intent instead of counting a token that may be alive."""
    warm, warm_path = node.mount(node.new_pod(), NGINX)  # the generator check and the role's lifetime cached
    assert warm.ok, warm.body
    reply = node.call("mount", str(node.volume_dir(pod := node.new_pod())),
                      json.dumps(node.options(pod, "token", NGINX)), env={**node.env, "VAULT_ADDR": closed_addr()})
    assert not reply.ok and "cannot reach Vault" in reply.body["message"], reply.body
    assert node.driver_calls()[-1]["vault"] == "broker"
    assert not node.intents()
    assert node.unmount(warm_path).ok


def test_an_unmount_revokes_both_tokens_in_one_broker_request(node, agent, bao):
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    info = json.loads((path / "vault-token.json").read_text())
    pod_token, wrapping_token = info["wrapped_accessor"], info["accessor"]
    assert bao.lookup_accessor(pod_token) and bao.lookup_accessor(wrapping_token)
    before = broker_status(agent)["relayed"]
    assert node.unmount(path).ok
    assert broker_status(agent)["relayed"] == before + 1  # one round trip, not one per token
    assert bao.lookup_accessor(pod_token) is None and bao.lookup_accessor(wrapping_token) is None
    assert node.driver_calls()[-1]["vault"] == "broker"


def test_an_agent_without_the_batch_is_asked_once_per_token(node, bao, monkeypatch):
    """An agent from before revoke_accessors (a DaemonSet mid-rollout) refuses it; each token is then
    revoked on its own: the real broker, in-process, with the op taken out."""
    from vaulttmpfs.engine.operation import Engine
    from vaulttmpfs.engine.record import VolumeRecord
    from vaulttmpfs.flexvolume import broker, protocol
    from vaulttmpfs.node import broker_server

    monkeypatch.setattr(broker_server, "OPS", broker_server.OPS - {"revoke_accessors"})
    config, problem = protocol.load_settings(node.env)
    assert problem is None
    server = broker_server.BrokerServer(config)
    server.start()
    try:
        tokens = [bao.create_token(policies=["nginx"])["accessor"] for _ in range(2)]
        found, why = broker.find(config.broker_socket, node.env)
        assert found, why
        engine = Engine(config, vault=found)
        outcome = engine.revoke_or_queue(VolumeRecord(*tokens, pod_uid="p"), _Logger(), why="test")
        assert str(outcome).startswith("token revoked"), outcome
        assert [bao.lookup_accessor(t) for t in tokens] == [None, None]
        assert server.status()["relayed"] == 2
        assert server.status()["failed"] == 0
    finally:
        server.stop()


class _Logger:
    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


def test_without_an_agent_the_call_is_standalone_and_says_so(node, bao):
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert node.driver_calls()[-1]["vault"].startswith("standalone: no broker socket at ")
    accessor = token_accessor(path)
    assert node.unmount(path).ok
    assert bao.lookup_accessor(accessor) is None


def test_exec_killed_after_the_mint_before_the_record_leaves_no_token(node, agent, bao):
    pod = node.new_pod()
    proc, path = node.start_mount(pod, {**node.env, STOP: "1"})
    assert wait_for(lambda: stopped_after_the_mint(proc), timeout=60)  # minted and journalled; the exec holds it
    [entry] = node.journalled()
    assert bao.lookup_accessor(entry["accessors"][0])  # the token is alive right now
    proc.kill()  # kill -9 at that step: no record, no tmpfs
    proc.wait()
    assert wait_for(lambda: not node.journalled(), timeout=30)
    for accessor in entry["accessors"]:
        assert bao.lookup_accessor(accessor) is None, "an orphaned mint outlived the call"
    assert not is_mount_point(path)
    assert broker_status(agent)["revoked_orphans"] == 1
    assert not node.intents(), "the revoked mint is still counted as a token that may be alive"
    reply, path = node.mount(pod, NGINX)  # the kubelet's retry
    assert reply.ok, reply.body
    assert bao.lookup_accessor(token_accessor(path))
    assert node.unmount(path).ok


def test_a_retry_is_handed_the_mint_still_in_flight_not_a_second_one(driver_cmd, bao, generator, tmp_path,
                                                                      log_dir):
    with FaultServer(bao.addr) as vault:
        node, agent = node_behind(vault, driver_cmd, bao, generator, tmp_path, log_dir)
        try:
            warm, warm_path = node.mount(node.new_pod(), NGINX)  # the generator check, out of the way
            assert warm.ok, warm.body
            vault.add(CREATE, "delay", times=1)  # Vault acts at once; its answer is held back
            pod = node.new_pod()
            first, path = node.start_mount(pod)
            assert vault.arrived.wait(60)
            first.send_signal(signal.SIGKILL)  # the kubelet gave up on it: killed while Vault answers
            first.wait()
            retry, _ = node.start_mount(pod)
            assert wait_for(lambda: broker_status(agent)["handed_over"] == 1, timeout=30)
            vault.release.set()
            out, _ = retry.communicate(timeout=60)
            assert json.loads(out)["status"] == "Success", out
            assert vault.count(CREATE, "POST") == 2  # the warm-up's and the first call's: never resent
            accessor = token_accessor(path)
            assert bao.lookup_accessor(accessor)
            assert wait_for(lambda: not node.journalled(), timeout=30)
            assert bao.lookup_accessor(accessor), "the handed-over token was revoked by the dead call's settling"
            assert not node.intents(), "the killed call's create is still counted though its token is recorded"
            assert node.unmount(path).ok and node.unmount(warm_path).ok
            assert bao.lookup_accessor(accessor) is None
        finally:
            agent.stop()


def test_a_retry_is_never_handed_a_mint_whose_tokens_it_revoked(node, agent, bao, generator):
    """A call killed after its record, before mount(2): the kubelet's retry takes the volume's lock before the
    broker settles the dead call, revokes the record's tokens (a stale volume) and asks for a mint of its own.
    The dead call's mint, not yet settled, matches that ask: handing it over gave the pod a revoked token."""
    from vaulttmpfs.engine.state import StateStore
    from vaulttmpfs.flexvolume import broker, protocol

    config, problem = protocol.load_settings(node.env)
    assert problem is None
    volume = (str(node.volume_dir(node.new_pod())), "pod-uid")
    ask = (config.role_name, ["nginx"], {"pod": "p"}, "retry-test")

    def call():  # one driver call's broker, as `broker.find` hands it to the engine
        found, why = broker.find(config.broker_socket, node.env)
        assert found, why
        return found

    dead = call()
    first = dead(config, generator["token"]).create_wrapped_token(*ask, volume=volume)
    with StateStore(config.state_dir).locked(volume[0]):  # the retry's lock: the dead call's settling waits behind it
        for held in dead._held:
            held.close()  # the call is killed -9
        retry = call()
        assert retry(config, generator["token"]).revoke_accessors(
            [first["wrapped_accessor"], first["accessor"]]) == [True, True]
        second = retry(config, generator["token"]).create_wrapped_token(*ask, volume=volume)
        assert second["wrapped_accessor"] != first["wrapped_accessor"], "handed the tokens it had just revoked"
        assert bao.lookup_accessor(second["wrapped_accessor"])
        assert broker_status(agent)["handed_over"] == 0
    for held in retry._held:
        held.close()  # the retry ends without a record: its own mint is revoked too
    assert wait_for(lambda: not node.journalled(), timeout=30)
    assert bao.lookup_accessor(second["wrapped_accessor"]) is None
    assert broker_status(agent)["minting"] == 0


def test_an_agent_killed_with_a_mint_in_its_journal_settles_it_when_it_starts_again(node, driver_cmd, bao):
    agent = AgentProcess.brokering(driver_cmd, node.env)
    pod = node.new_pod()
    proc, path = node.start_mount(pod, {**node.env, STOP: "1"})
    try:
        assert wait_for(lambda: stopped_after_the_mint(proc), timeout=60)
        [entry] = node.journalled()
        agent.kill()  # kill -9 the broker while the call holds its token
        proc.kill()  # and the call
        proc.wait()
        assert node.journalled() == [entry] and bao.lookup_accessor(entry["accessors"][0])
        agent = AgentProcess.brokering(driver_cmd, node.env)
        assert wait_for(lambda: not node.journalled(), timeout=30)
        for accessor in entry["accessors"]:
            assert bao.lookup_accessor(accessor) is None
        assert not is_mount_point(path)
    finally:
        agent.stop()


def test_a_call_that_recorded_its_token_keeps_it_when_the_agent_restarts(node, driver_cmd, bao):
    agent = AgentProcess.brokering(driver_cmd, node.env)
    proc, path = node.start_mount(node.new_pod(), {**node.env, STOP: "1"})
    try:
        assert wait_for(lambda: stopped_after_the_mint(proc), timeout=60)
        assert node.journalled()
        agent.kill()  # the broker dies; the call goes on, records and mounts its token
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
        assert json.loads(out)["status"] == "Success", out
        accessor = token_accessor(path)
        agent = AgentProcess.brokering(driver_cmd, node.env)
        assert wait_for(lambda: not node.journalled(), timeout=30)
        assert bao.lookup_accessor(accessor), "a recorded token was revoked"
        assert node.unmount(path).ok
        assert bao.lookup_accessor(accessor) is None
    finally:
        agent.stop()


def test_a_broker_killed_while_vault_answers_fails_the_call_and_nothing_is_minted_again(driver_cmd, bao, generator,
                                                                                       tmp_path, log_dir):
    """After the commit point the call never falls back to standalone: that could mint a second token."""
    with FaultServer(bao.addr) as vault:
        node, agent = node_behind(vault, driver_cmd, bao, generator, tmp_path, log_dir)
        pod = node.new_pod()
        before = set(bao.accessors())
        try:
            vault.add(CREATE, "delay", times=1)
            call, path = node.start_mount(pod)
            assert vault.arrived.wait(60)
            agent.kill()  # kill -9 the broker while Vault's answer is on its way
            out, _ = call.communicate(timeout=60)
            reply = json.loads(out)
            assert reply["status"] == "Failure" and "not redone here" in reply["message"], reply
            assert vault.count(CREATE, "POST") == 1  # not resent by the driver, standalone or otherwise
            assert not is_mount_point(path)
        finally:
            vault.release.set()
            agent.stop()
        # The one token Vault made, and its wrapping token, went to the dead agent (known to nobody: see
        # broker_server); the test revokes them so none outlives the suite.
        made = [a for a in set(bao.accessors()) - before
                if ((bao.lookup_accessor(a) or {}).get("meta") or {}).get("pod_uid") == pod.uid
                or (bao.lookup_accessor(a) or {}).get("policies") == ["response-wrapping"]]
        assert len(made) == 2, made  # one create: the pod token and its wrapping token
        for accessor in made:
            bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
