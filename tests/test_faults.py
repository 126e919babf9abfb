"""Faults, with real parts wherever a real part can produce them: a sealed OpenBao, a revoked
generator token, TLS with the right and the wrong CA, a full tmpfs, a driver killed with SIGKILL.
Only 500s, hangs and held answers come from a loopback HTTP server (tests/faultserver.py)
standing in front of the real OpenBao.

After every fault: one Failure JSON object (or a Success once the fault is gone), nothing
mounted, no state left, and Vault's token count back where it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from .agents import AgentProcess
from .conftest import (
    driver_env,
    on_source_and_build,
    remember_secret,
    source_cmd,
    token_file,
    unmount_everything_under,
)
from .csikubelet import new_pod
from .csinode import CsiNode
from .faultserver import CREATE, LOOKUP_SELF, FaultServer, wait_for
from .kubelet import Kubelet, is_mount_point
from .pki import issue, make_ca, openssl
from .vaultserver import VaultServer, bao_binary, closed_addr, free_port
from .volumes import assert_refused, fill, mounts_under, read_wrap, small_state_fs, state_records

NGINX = {"vault/policies": "nginx"}


def node(server: VaultServer, token_path: str, driver_cmd, tmp_path: Path, log_dir: Path, **extra) -> Kubelet:
    root = tmp_path / "node"
    root.mkdir(exist_ok=True)
    kubelet = Kubelet(driver_cmd, driver_env(server, {"path": token_path}, root, log_dir, **extra), root)
    return kubelet


@contextmanager
def faulty_node(bao: VaultServer, generator: dict, driver_cmd, tmp_path: Path, log_dir: Path):
    """The `faulty` fixture's kubelet and gateway, for one driver of a test that runs both at once."""
    tmp_path.mkdir()
    with FaultServer(bao.addr) as fault:
        kubelet = node(bao, generator["path"], driver_cmd, tmp_path, log_dir, VAULT_ADDR=fault.addr)
        try:
            yield kubelet, fault
        finally:
            unmount_everything_under(kubelet.root)


def all_clear(kubelet: Kubelet, server: VaultServer, before: int) -> None:
    assert mounts_under(kubelet.root) == []
    assert state_records(kubelet) == []
    assert len(server.accessors()) == before


# --- 500s, hangs, drips: a loopback server in front of the real one ---------------------------

def test_vault_answering_500_then_recovering_is_retried_and_mints_once(faulty, fault, bao):
    # Retried where resending is harmless (the generator check, a lookup); the create itself is
    # never resent (see test_review_faults: a gateway may answer 5xx after Vault minted).
    faulty.env["VAULT_MAX_RETRIES"] = "3"
    fault.add(LOOKUP_SELF, "error", times=2)
    before = len(bao.accessors())
    reply, path = faulty.mount(faulty.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert fault.count(LOOKUP_SELF) == 3 and fault.count(CREATE) == 1
    assert len(bao.accessors()) == before + 2  # one pod token and its wrapping token
    read_wrap(path)
    assert faulty.teardown(path).ok
    all_clear(faulty, bao, before)


def test_vault_answering_500_forever_fails_in_bounded_time(faulty, fault, bao):
    faulty.env["VAULT_MAX_RETRIES"] = "2"
    fault.add(LOOKUP_SELF, "error")
    before = len(bao.accessors())
    reply, _ = faulty.mount(faulty.new_pod(), NGINX)
    assert_refused(reply, faulty, bao, before, "Vault answered 500: injected fault")
    assert fault.count(LOOKUP_SELF) == 3  # the first try and two retries, then a clear Failure
    assert fault.count(CREATE) == 0
    assert reply.seconds < 30


def refused_in_bounded_time(bao, generator, tmp_path, log_dir, at: str, action: str, retries: str,
                            expected: str) -> dict[str, int]:
    """A mount through a gateway that does `action` at `at`, by the source and the build side by side (the
    wait is the driver's deadline): refused, nothing minted, in bounded time. The creates each gateway saw."""
    creates = {}

    def refused(kind, driver_cmd):
        with faulty_node(bao, generator, driver_cmd, tmp_path / kind, log_dir) as (faulty, fault):
            faulty.env.update(VAULT_CLIENT_TIMEOUT="2s", VAULT_MAX_RETRIES=retries)
            fault.add(at, action)
            before = len(bao.accessors())  # neither fault lets a token be minted: holds while the other runs
            reply, _ = faulty.mount(faulty.new_pod(), NGINX)
            assert_refused(reply, faulty, bao, before, expected)
            assert reply.seconds < 20
            creates[kind] = fault.count(CREATE)

    on_source_and_build(refused)
    return creates


def test_a_hanging_vault_fails_in_bounded_time_and_the_create_is_not_sent_twice(bao, generator, tmp_path, log_dir):
    creates = refused_in_bounded_time(bao, generator, tmp_path, log_dir, CREATE, "hang", "2", "did not answer in time")
    assert creates == {"source": 1, "build": 1}  # Vault may have acted on it: resending could mint twice


def test_a_vault_dripping_its_answer_is_cut_off_in_bounded_time(bao, generator, tmp_path, log_dir):
    # One byte a second never trips a per-read timeout; the whole call has a deadline too.
    creates = refused_in_bounded_time(bao, generator, tmp_path, log_dir, LOOKUP_SELF, "drip", "1",
                                      "did not finish answering within 6s")
    assert creates == {"source": 0, "build": 0}


# In the node agent a Vault call runs on a worker thread, where no SIGALRM can cut it: its deadline is
# the agent's watchdog's, which shuts the call's sockets down. 2 s x (1 + 2) = a 6 s deadline.
DRIP_SETTINGS = {"VAULT_CLIENT_TIMEOUT": "2s", "VAULT_MAX_RETRIES": "1"}


def revoke_made_for(bao, before: set[str], pod_uid: str) -> int:
    """The tokens a create made behind a lost answer (the pod's and its wrapping token): revoked, so
    none outlives the suite. How many there were."""
    made = [a for a in set(bao.accessors()) - before
            if ((bao.lookup_accessor(a) or {}).get("meta") or {}).get("pod_uid") == pod_uid
            or (bao.lookup_accessor(a) or {}).get("policies") == ["response-wrapping"]]
    for accessor in made:
        bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
    return len(made)


def test_a_vault_dripping_a_create_s_answer_is_cut_off_in_the_csi_agent(bao, generator, tmp_path, log_dir):
    with FaultServer(bao.addr) as fault:
        node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir, VAULT_ADDR=fault.addr, **DRIP_SETTINGS).start()
        kubelet = node.kubelet
        try:
            warm = new_pod(namespace="shop")  # the generator check is cached: only the create drips
            kubelet.publish(warm, NGINX)
            kubelet.teardown(warm)
            before = set(bao.accessors())
            fault.add(CREATE, "drip", times=1)  # Vault mints; its answer comes a byte a second
            pod = new_pod(namespace="shop")
            outcome: dict = {}

            def publish() -> None:
                started = time.monotonic()
                try:
                    kubelet.publish(pod, NGINX, timeout=60)
                    outcome["code"] = "OK"
                except grpc.RpcError as exc:
                    outcome["code"], outcome["details"] = exc.code(), exc.details()
                outcome["seconds"] = time.monotonic() - started

            publishing = threading.Thread(target=publish)
            publishing.start()
            assert wait_for(lambda: fault.count(CREATE) == 2, 30)
            # The kubelet gives up on the publish and unpublishes: it waits on the volume's lock, only
            # until the create's deadline.
            started = time.monotonic()
            kubelet.unpublish(pod, timeout=20)
            unpublished = time.monotonic() - started
            publishing.join(30)
            assert outcome["code"] == grpc.StatusCode.UNAVAILABLE, outcome
            assert "did not finish answering within 6s" in outcome["details"], outcome
            assert 5 < outcome["seconds"] < 12 and unpublished < 12, (outcome, unpublished)
            assert not os.path.ismount(kubelet.target_path(pod))
            # Not taken as "minted nothing": the create reached Vault, so its intent counts the stray.
            assert len(os.listdir(Path(node.env["VAULTTMPFS_STATE_DIR"]) / "intents")) == 1
            assert revoke_made_for(bao, before, pod.uid) == 2
            # The agent and its kept-alive connections still serve.
            again = new_pod(namespace="shop")
            kubelet.publish(again, NGINX)
            kubelet.teardown(again)
            assert set(bao.accessors()) == before
        finally:
            fault.release.set()
            node.stop()


def test_a_vault_dripping_its_answer_is_cut_off_in_the_broker(driver_cmd, bao, generator, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    with FaultServer(bao.addr) as fault:
        node = Kubelet(driver_cmd, driver_env(bao, generator, root, log_dir, VAULT_ADDR=fault.addr,
                                              **DRIP_SETTINGS), root)
        agent = AgentProcess.brokering(driver_cmd, node.env)
        try:
            before = len(bao.accessors())
            fault.add(LOOKUP_SELF, "drip", times=1)  # the generator check, made by the agent's broker
            reply, path = node.mount(node.new_pod(), NGINX)
            assert_refused(reply, node, bao, before, "did not finish answering within 6s")
            assert 5 < reply.seconds < 12, reply.seconds
            unmount = node.unmount(path)  # the volume's lock is free
            assert unmount.ok and unmount.seconds < 5, unmount.body
            reply, path = node.mount(node.new_pod(), NGINX)
            assert reply.ok, reply.body
            read_wrap(path)
            assert node.teardown(path).ok
            all_clear(node, bao, before)
        finally:
            fault.release.set()
            agent.stop()
            unmount_everything_under(root)


def intents(kubelet) -> list[str]:
    """The notes of creates that may have minted a token nobody recorded (engine.intents)."""
    directory = Path(kubelet.env["VAULTTMPFS_STATE_DIR"]) / "intents"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


@pytest.mark.parametrize("status", [503, 501])
def test_a_gateway_s_503_or_501_after_the_create_reached_vault_keeps_its_intent(faulty, fault, bao, status):
    # A gateway (Envoy after an upstream reset) may answer 503 after forwarding the create: Vault minted.
    # Only Vault's own "Vault is sealed" says nothing was done (test_sealed_vault_...).
    fault.add(CREATE, "forward-then-error", times=1, status=status)
    before = set(bao.accessors())
    pod = faulty.new_pod()
    reply, path = faulty.mount(pod, NGINX)
    assert reply.status == "Failure" and reply.exit_code == 1, reply.body
    assert f"answered {status}" in reply.message and "sealed" not in reply.message, reply.message
    assert not is_mount_point(path) and state_records(faulty) == []
    assert len(intents(faulty)) == 1  # the stray is counted until its bound passes
    assert fault.count(CREATE) == 1  # and never resent
    assert revoke_made_for(bao, before, pod.uid) == 2


def test_the_root_check_costs_one_lookup_per_generator_token_not_one_per_mount(faulty, fault):
    paths = []
    for _ in range(3):
        reply, path = faulty.mount(faulty.new_pod(), NGINX)
        assert reply.ok, reply.body
        paths.append(path)
    assert fault.count(LOOKUP_SELF) == 1 and fault.count(CREATE) == 3
    for path in paths:
        read_wrap(path)
        assert faulty.teardown(path).ok


# --- kill -9 mid-mount, then the kubelet's retry --------------------------------------------------

def start_mount(kubelet: Kubelet, pod) -> tuple[subprocess.Popen, Path]:
    path = kubelet.volume_dir(pod)
    options = json.dumps(kubelet.options(pod, "token", NGINX))
    proc = subprocess.Popen([*kubelet.driver_cmd, "mount", str(path), options], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=kubelet.env)
    return proc, path


def kill_at_the_fault(proc: subprocess.Popen, fault: FaultServer) -> None:
    assert fault.arrived.wait(60), "the driver never reached Vault"
    os.kill(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and output == b""  # the kubelet sees a failed call


def kubelet_retry(kubelet: Kubelet, pod, path: Path):
    """The kubelet after a failed mount: a dir that is a mount point counts as mounted (mount is
    not called again); otherwise the dir is removed, made again and mount is called."""
    assert not is_mount_point(path), "a half-made mount the kubelet would never retry"
    os.rmdir(path)
    reply, again = kubelet.mount(pod, NGINX)
    assert again == path
    return reply


def test_kill_9_while_vault_has_not_acted_recovers_with_no_leak(faulty, fault, bao):
    fault.add(CREATE, "hang", times=1)
    before = len(bao.accessors())
    pod = faulty.new_pod()
    proc, path = start_mount(faulty, pod)
    kill_at_the_fault(proc, fault)
    reply = kubelet_retry(faulty, pod, path)
    assert reply.ok, reply.body
    wrap = read_wrap(path)
    assert bao.lookup_accessor(wrap["wrapped_accessor"])["meta"]["pod_uid"] == pod.uid
    assert faulty.teardown(path).ok
    all_clear(faulty, bao, before)


def test_kill_9_after_vault_minted_recovers_leaving_one_unreachable_expiring_token(faulty, fault, bao):
    # The residual window, measured: Vault created the token, the driver died before it could
    # record it. Nobody holds it (the wrapping token died with the process); it is an orphan
    # that expires at the end of the role's period because nobody can renew it.
    fault.add(CREATE, "hold-answer", times=1)
    before = set(bao.accessors())
    pod = faulty.new_pod()
    proc, path = start_mount(faulty, pod)
    kill_at_the_fault(proc, fault)
    reply = kubelet_retry(faulty, pod, path)
    assert reply.ok, reply.body
    read_wrap(path)
    assert faulty.teardown(path).ok
    assert mounts_under(faulty.root) == [] and state_records(faulty) == []
    leaked = {a: bao.lookup_accessor(a) for a in set(bao.accessors()) - before}
    pod_tokens = [d for d in leaked.values() if (d.get("meta") or {}).get("pod_uid") == pod.uid]
    wrapping = [d for d in leaked.values() if d.get("policies") == ["response-wrapping"]]
    assert len(leaked) == 2 and len(pod_tokens) == 1 and len(wrapping) == 1, leaked
    assert pod_tokens[0]["orphan"] and 0 < pod_tokens[0]["ttl"] <= 3600  # the role's token_period
    assert 0 < wrapping[0]["ttl"] <= 300  # VAULT_WRAP_TTL
    for accessor in leaked:
        bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
    assert set(bao.accessors()) == before


# --- a full tmpfs -----------------------------------------------------------------------------------

def test_a_full_tmpfs_fails_unmounted_with_the_token_revoked(kubelet, bao, tmp_path):
    ca = tmp_path / "big-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n" + "A" * 64 * 1024 + "\n-----END CERTIFICATE-----\n")
    kubelet.env.update(VAULTTMPFS_TMPFS_SIZE="4k", VAULT_CACERT=str(ca))
    before = len(bao.accessors())
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert_refused(reply, kubelet, bao, before, "cannot write ca.crt")
    assert "No space left on device" in reply.message and "VAULTTMPFS_TMPFS_SIZE=4k" in reply.message
    assert not is_mount_point(path) and os.listdir(path) == []


# --- a full state filesystem ------------------------------------------------------------------------

def test_a_full_state_filesystem_refuses_mounts_before_minting_and_lets_pods_go(kubelet, bao):
    with small_state_fs(kubelet.root) as state:
        reply, mounted = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.ok, reply.body
        wrap = read_wrap(mounted)
        fill(state)
        before = set(bao.accessors())

        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.status == "Failure" and reply.exit_code == 1, reply.body
        # What, where, why and what to do, in the kubelet's event: not a bare "[Errno 28]".
        assert "No space left on device" in reply.message and "nothing was sent to Vault" in reply.message
        assert f"the state dir {state} (VAULTTMPFS_STATE_DIR) is full" in reply.message, reply.message
        assert set(bao.accessors()) == before and not is_mount_point(path)

        reply = kubelet.unmount(mounted)  # a revocation needs no space
        assert reply.ok, reply.body
        assert not is_mount_point(mounted) and bao.lookup_accessor(wrap["wrapped_accessor"]) is None
        assert state_records(kubelet) == []


def test_a_full_state_filesystem_with_vault_down_keeps_the_volume_until_it_can_revoke(kubelet, bao):
    with small_state_fs(kubelet.root) as state:
        reply, mounted = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.ok, reply.body
        wrap = read_wrap(mounted)
        filler = fill(state)
        kubelet.env["VAULT_ADDR"] = closed_addr()

        # Neither revoked nor queued: the unmount fails, and what names the token (tmpfs, record) stays.
        reply = kubelet.unmount(mounted)
        assert reply.status == "Failure" and reply.exit_code == 1, reply.body
        assert f"token {wrap['wrapped_accessor']} could not be revoked (" in reply.message, reply.message
        assert "cannot reach Vault" in reply.message and "nor queued for a retry" in reply.message
        assert f"the state dir {state} (VAULTTMPFS_STATE_DIR) is full" in reply.message
        assert is_mount_point(mounted) and len(state_records(kubelet)) == 1
        assert bao.lookup_accessor(wrap["wrapped_accessor"]) is not None

        filler.unlink()  # the kubelet calls again once the node is healthy
        kubelet.env["VAULT_ADDR"] = bao.addr
        reply = kubelet.unmount(mounted)
        assert reply.ok, reply.body
        assert not is_mount_point(mounted) and bao.lookup_accessor(wrap["wrapped_accessor"]) is None
        assert state_records(kubelet) == []


def test_a_read_only_state_filesystem_is_named_and_nothing_is_minted(kubelet, bao):
    with small_state_fs(kubelet.root) as state:
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        before = set(bao.accessors())
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.status == "Failure" and reply.exit_code == 1, reply.body
        assert "Read-only file system" in reply.message, reply.message
        assert f"the state dir {state} (VAULTTMPFS_STATE_DIR) is on a read-only filesystem" in reply.message
        assert set(bao.accessors()) == before and not is_mount_point(path)


# --- real OpenBao faults: sealed, generator revoked ------------------------------------------------

@pytest.fixture(scope="module")
def sealable():
    """A server of its own: sealing the session's would break every other test."""
    with VaultServer() as server:
        server.setup_driver()
        remember_secret(server.root_token)
        yield server


def bao_cli(server: VaultServer, *args: str) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": server.workdir, "BAO_ADDR": server.addr,
           "BAO_TOKEN": server.root_token}
    subprocess.run([bao_binary(), *args], env=env, check=True, capture_output=True, timeout=30)


def test_sealed_vault_fails_mounts_clearly_and_unmount_queues_until_unsealed(sealable, driver_cmd, tmp_path,
                                                                           log_dir):
    kubelet = node(sealable, token_file(tmp_path, sealable.generator_token()["client_token"]), driver_cmd,
                   tmp_path, log_dir, VAULT_MAX_RETRIES="1", VAULT_CLIENT_TIMEOUT="3s")
    try:
        reply, mounted = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.ok, reply.body
        wrap = read_wrap(mounted)
        bao_cli(sealable, "operator", "seal")

        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.status == "Failure" and reply.exit_code == 1, reply.body
        assert "is sealed: Vault is sealed" in reply.message and sealable.addr in reply.message
        assert reply.seconds < 30 and not is_mount_point(path)
        assert intents(kubelet) == []  # Vault's own answer: a sealed Vault minted nothing

        reply = kubelet.unmount(mounted)  # a pod must still be able to go away
        assert reply.ok and "queued" in reply.message, reply.body
        assert not is_mount_point(mounted)

        key = re.search(r"Unseal Key: (\S+)", Path(sealable.log_path).read_text()).group(1)
        bao_cli(sealable, "operator", "unseal", key)
        assert sealable.lookup_accessor(wrap["wrapped_accessor"]) is not None
        retry = kubelet.call_cli("retry-revocations")
        assert retry.returncode == 0, retry.stdout + retry.stderr
        assert sealable.lookup_accessor(wrap["wrapped_accessor"]) is None
        assert sealable.lookup_accessor(wrap["accessor"]) is None
        assert state_records(kubelet) == [] and mounts_under(kubelet.root) == []
    finally:
        unmount_everything_under(kubelet.root)


def test_a_revoked_generator_token_fails_with_the_fix(bao, driver_cmd, tmp_path, log_dir):
    auth = bao.generator_token(ttl="10m")
    kubelet = node(bao, token_file(tmp_path, auth["client_token"]), driver_cmd, tmp_path, log_dir)
    try:
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)  # known good first: the root check is cached
        assert reply.ok, reply.body
        read_wrap(path)
        bao.revoke_token(auth["client_token"])
        before = len(bao.accessors())
        reply, _ = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.status == "Failure" and reply.exit_code == 1, reply.body
        assert "403" in reply.message and "may be expired or revoked" in reply.message
        assert kubelet.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] in reply.message
        assert len(bao.accessors()) == before and len(mounts_under(kubelet.root)) == 1
        # a node where the check is not cached yet says the same
        (kubelet.root / "state" / "generator-check.json").unlink()
        reply, _ = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.status == "Failure" and "may be expired or revoked" in reply.message, reply.body
        # its pod token outlives it (orphan): unmount still revokes it, through a new generator token
        fresh = bao.generator_token(ttl="10m")
        kubelet.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] = token_file(tmp_path, fresh["client_token"])
        assert kubelet.teardown(path).ok
        assert state_records(kubelet) == [] and mounts_under(kubelet.root) == []
        bao.revoke_token(fresh["client_token"])
    finally:
        unmount_everything_under(kubelet.root)


# --- TLS -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory):
    """A real OpenBao with a TLS listener whose certificate names only `vault.test` (no IP)."""
    pki = tmp_path_factory.mktemp("tls")
    for ca in ("good-ca", "wrong-ca"):
        make_ca(pki, ca)
    issue(pki, "server", "good-ca", "/CN=vault.test", san="DNS:vault.test")
    hashed = pki / "capath-hashed"
    hashed.mkdir()
    (hashed / "good-ca.pem").write_bytes((pki / "good-ca.pem").read_bytes())
    openssl("rehash", str(hashed), cwd=pki)
    for name, ca in (("capath-plain", "good-ca.pem"), ("capath-wrong", "wrong-ca.pem")):
        (pki / name).mkdir()
        (pki / name / ca).write_bytes((pki / ca).read_bytes())
        (pki / name / "notes.txt").write_text("not a certificate: skipped\n")
    port = free_port()
    (pki / "listener.hcl").write_text(f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
                                      f'  tls_cert_file = "{pki}/server.pem"\n'
                                      f'  tls_key_file = "{pki}/server.key"\n}}\n')
    with VaultServer(extra_args=[f"-config={pki / 'listener.hcl'}"]) as server:
        server.setup_driver()
        remember_secret(server.root_token)
        generator = token_file(pki, server.generator_token()["client_token"])
        yield {"server": server, "pki": pki, "addr": f"https://127.0.0.1:{port}", "generator": generator}


@pytest.fixture
def tls_node(tls_bao, driver_cmd, tmp_path, log_dir):
    kubelet = node(tls_bao["server"], tls_bao["generator"], driver_cmd, tmp_path, log_dir,
                   VAULT_ADDR=tls_bao["addr"])
    yield kubelet
    unmount_everything_under(kubelet.root)


@pytest.mark.parametrize("settings", [
    {"VAULT_CACERT": "good-ca.pem", "VAULT_TLS_SERVER_NAME": "vault.test"},
    {"VAULT_CAPATH": "capath-hashed", "VAULT_TLS_SERVER_NAME": "vault.test"},
    # Unhashed, as Vault's Go client (and the original driver) read it: every PEM file in the dir.
    {"VAULT_CAPATH": "capath-plain", "VAULT_TLS_SERVER_NAME": "vault.test"},
])
def test_tls_with_the_ca_the_driver_is_given(tls_node, tls_bao, settings):
    pki = tls_bao["pki"]
    tls_node.env.update({k: str(pki / v) if k != "VAULT_TLS_SERVER_NAME" else v for k, v in settings.items()})
    reply, path = tls_node.mount(tls_node.new_pod(), NGINX)
    assert reply.ok, reply.body
    wrap = read_wrap(path)
    assert tls_node.teardown(path).ok
    assert tls_bao["server"].lookup_accessor(wrap["wrapped_accessor"]) is None


@pytest.mark.parametrize("settings, expected", [
    ({"VAULT_CACERT": "wrong-ca.pem", "VAULT_TLS_SERVER_NAME": "vault.test"}, "certificate verify failed"),
    ({"VAULT_CAPATH": "capath-wrong", "VAULT_TLS_SERVER_NAME": "vault.test"}, "certificate verify failed"),
    ({"VAULT_CACERT": "good-ca.pem"}, "IP address mismatch"),  # the certificate names vault.test only
    ({"VAULT_CACERT": "good-ca.pem", "VAULT_TLS_SERVER_NAME": "other.test"}, "'other.test' doesn't match"),
    ({}, "certificate verify failed"),  # the system CAs do not know a private CA
])
def test_tls_with_a_ca_or_name_that_does_not_fit_fails_clearly(tls_node, tls_bao, settings, expected):
    pki = tls_bao["pki"]
    tls_node.env.update({k: str(pki / v) if k != "VAULT_TLS_SERVER_NAME" else v for k, v in settings.items()})
    server = tls_bao["server"]
    before = len(server.accessors())
    reply, _ = tls_node.mount(tls_node.new_pod(), NGINX)
    assert_refused(reply, tls_node, server, before, expected)
    assert f"TLS to {tls_bao['addr']} failed" in reply.message
    assert "VAULT_CACERT/VAULT_CAPATH/VAULT_TLS_SERVER_NAME" in reply.message


def test_skip_verify_over_tls_only_with_explicit_consent(tls_node, tls_bao):
    server = tls_bao["server"]
    tls_node.env["VAULT_SKIP_VERIFY"] = "1"
    before = len(server.accessors())
    reply, _ = tls_node.mount(tls_node.new_pod(), NGINX)
    assert_refused(reply, tls_node, server, before, "VAULT_SKIP_VERIFY is set")
    tls_node.env["VAULTTMPFS_ALLOW_INSECURE"] = "true"
    reply, path = tls_node.mount(tls_node.new_pod(), NGINX)  # urllib3 warns on stderr: still one JSON object
    assert reply.ok, reply.body
    wrap = read_wrap(path)
    # Consent withdrawn: unmount still unmounts (a pod must be able to go away) and queues the revocation.
    del tls_node.env["VAULTTMPFS_ALLOW_INSECURE"]
    reply = tls_node.unmount(path)
    assert reply.ok and "queued" in reply.message, reply.body
    tls_node.env.update(VAULT_SKIP_VERIFY="", VAULT_CACERT=str(tls_bao["pki"] / "good-ca.pem"),
                        VAULT_TLS_SERVER_NAME="vault.test")
    retry = tls_node.call_cli("retry-revocations")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert server.lookup_accessor(wrap["wrapped_accessor"]) is None
    assert len(server.accessors()) == before
