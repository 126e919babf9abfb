"""Issue 9: the faults an independent review drove the driver into, each reproduced for real.

Real OpenBao, real tmpfs, the driver exec'd as the kubelet does (source and build). Where a
gateway misbehaves (acts then answers 502, strips X-Vault-Wrap-TTL, holds an answer back) a
real loopback proxy stands in front of OpenBao (tests/faultserver.py). Each test ends with no
mount, no record and no live token of its own; the tokens a fault orphans on purpose (the
documented residual of a 502 after minting) are found with the root token, counted and revoked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .agents import AgentProcess
from .conftest import driver_env, on_source_and_build, remember_secret, unmount_everything_under
from .faultserver import CREATE, FaultServer, wait_for
from .kubelet import Kubelet, is_mount_point
from .otheruser import NOBODY, become, other_user
from .vaultserver import dies_with_parent, free_port
from .volumes import mounts_under, read_wrap, state_records

NGINX = {"vault/policies": "nginx"}
REVOKE = "/v1/auth/token/revoke-accessor"
FLOCK_SYSCALL = {"x86_64": 73, "aarch64": 32}.get(os.uname().machine)


def stacked_mounts(path: Path) -> int:
    target = os.path.realpath(path)
    return sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.split()[4] == target)


def all_clear(kubelet: Kubelet, bao, before: int) -> None:
    assert mounts_under(kubelet.root) == []
    assert state_records(kubelet) == []
    assert len(bao.accessors()) == before


def start(kubelet: Kubelet, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*kubelet.driver_cmd, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=kubelet.env)


def finish(proc: subprocess.Popen) -> dict:
    output, _ = proc.communicate(timeout=60)
    return json.loads(output)


def blocked_or_done(proc: subprocess.Popen, fault: FaultServer, creates: int) -> bool:
    """The second caller either waits on the volume lock (flock) or got past it to Vault or an answer."""
    if proc.poll() is not None or fault.count(CREATE) >= creates:
        return True
    try:
        return Path(f"/proc/{proc.pid}/syscall").read_text().split()[0] == str(FLOCK_SYSCALL)
    except (OSError, IndexError):
        return False


def stale_record(kubelet: Kubelet) -> tuple:
    """A mounted volume whose tmpfs went away (a reboot): its record, and its token, remain."""
    pod = kubelet.new_pod()
    reply, path = kubelet.mount(pod, NGINX)
    assert reply.ok, reply.body
    read_wrap(path)
    subprocess.run(["umount", str(path)], check=True)
    assert len(state_records(kubelet)) == 1
    return pod, path


# --- 1. the per-volume lock survives a stale record ----------------------------------------------

def mount_held_in_vault(kubelet: Kubelet, fault: FaultServer, pod, path: Path) -> subprocess.Popen:
    fault.add(CREATE, "delay", times=1)  # Vault mints at once; its answer is held until released
    first = start(kubelet, "mount", str(path), json.dumps(kubelet.options(pod, "token", NGINX)))
    assert fault.arrived.wait(60), "the first mount never reached Vault"
    return first


def test_1_two_mounts_after_a_stale_record_stack_no_second_tmpfs(faulty, fault, bao):
    before = len(bao.accessors())
    pod, path = stale_record(faulty)
    first = mount_held_in_vault(faulty, fault, pod, path)
    second = start(faulty, "mount", str(path), json.dumps(faulty.options(pod, "token", NGINX)))
    assert wait_for(lambda: blocked_or_done(second, fault, 3), timeout=30)
    fault.release.set()
    assert finish(first)["status"] == "Success"
    assert finish(second) == {"status": "Success", "message": "already mounted"}
    assert stacked_mounts(path) == 1
    read_wrap(path)
    assert faulty.teardown(path).ok
    all_clear(faulty, bao, before)


def test_1_an_unmount_during_a_mount_after_a_stale_record_revokes_it(faulty, fault, bao):
    before = len(bao.accessors())
    pod, path = stale_record(faulty)
    first = mount_held_in_vault(faulty, fault, pod, path)
    unmount = start(faulty, "unmount", str(path))
    assert wait_for(lambda: blocked_or_done(unmount, fault, 3), timeout=30)
    fault.release.set()
    assert finish(first)["status"] == "Success"
    reply = finish(unmount)
    assert reply["status"] == "Success" and "token revoked" in reply["message"], reply
    assert not is_mount_point(path)
    all_clear(faulty, bao, before)


# --- 2. a 502 after Vault minted: never resent ----------------------------------------------------

def test_2_a_gateway_502_after_vault_minted_is_not_resent(faulty, fault, bao):
    faulty.env["VAULT_MAX_RETRIES"] = "2"
    fault.add(CREATE, "forward-then-error", times=1, status=502)
    before = set(bao.accessors())
    pod = faulty.new_pod()
    try:
        reply, path = faulty.mount(pod, NGINX)
        assert reply.status == "Failure" and "502" in reply.message, reply.body
        assert fault.count(CREATE) == 1  # sent once: Vault may have acted on it (here it did)
        assert mounts_under(faulty.root) == [] and state_records(faulty) == []
        # The documented residual: the driver never learnt the accessors. One pod token, one wrapping token.
        orphans = {a: bao.lookup_accessor(a) for a in set(bao.accessors()) - before}
        assert len(orphans) == 2, orphans
        assert [d["meta"]["pod_uid"] for d in orphans.values() if d.get("meta")] == [pod.uid]
    finally:
        for accessor in set(bao.accessors()) - before:  # found with the root token, revoked here
            bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
    reply, again = faulty.mount(pod, NGINX)  # the kubelet's retry: one more create, one token pair
    assert reply.ok and again == path, reply.body
    assert fault.count(CREATE) == 2 and len(set(bao.accessors()) - before) == 2
    read_wrap(path)
    assert faulty.teardown(path).ok
    all_clear(faulty, bao, len(before))


def test_2_a_revocation_is_resent_through_a_502(faulty, fault, bao):
    before = len(bao.accessors())
    reply, path = faulty.mount(faulty.new_pod(), NGINX)
    assert reply.ok, reply.body
    wrap = read_wrap(path)
    fault.add(REVOKE, "error", times=1, status=502)  # a revocation is idempotent: resent
    reply = faulty.teardown(path)
    assert reply.ok and "token revoked" in reply.message, reply.body
    assert fault.count(REVOKE) == 3 and bao.lookup_accessor(wrap["wrapped_accessor"]) is None
    all_clear(faulty, bao, before)


@pytest.mark.parametrize("body", ['{"errors":["injected fault"]}', "{}", "<html>OK</html>"])
def test_2b_a_gateways_own_200_to_a_revocation_is_not_taken_as_revoked(faulty, fault, bao, body):
    """Vault answers a revocation 204 (done) or 200 with a "no token found" warning (gone); a 200 of anybody
    else's (a gateway answering for it, never forwarding) may leave the token alive: queued, retried."""
    before = len(bao.accessors())
    reply, path = faulty.mount(faulty.new_pod(), NGINX)
    assert reply.ok, reply.body
    wrap = read_wrap(path)
    fault.add(REVOKE, "answer", status=200, body=body)
    reply = faulty.teardown(path)
    assert reply.ok and "queued" in reply.message and "token revoked" not in reply.message, reply.body
    assert bao.lookup_accessor(wrap["wrapped_accessor"]) is not None  # what was at stake: it is alive
    fault.clear()
    retry = faulty.call_cli("retry-revocations")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert bao.lookup_accessor(wrap["wrapped_accessor"]) is None and bao.lookup_accessor(wrap["accessor"]) is None
    all_clear(faulty, bao, before)


# --- 3. a proxy that strips X-Vault-Wrap-TTL ------------------------------------------------------

def test_3_a_plain_token_from_a_header_stripping_proxy_is_revoked(faulty, fault, bao):
    fault.add(CREATE, "strip-wrap-ttl")
    before = len(bao.accessors())
    for _ in range(3):  # the kubelet retries: not one live token per attempt
        reply, path = faulty.mount(faulty.new_pod(), NGINX)
        assert reply.status == "Failure", reply.body
        assert "plain token instead of a wrapped one" in reply.message and "token revoked" in reply.message
        assert not is_mount_point(path)
    assert fault.count(CREATE) == 3
    all_clear(faulty, bao, before)


# --- 4. a FIFO as the generator token file --------------------------------------------------------

def test_4_a_fifo_as_the_generator_token_fails_fast(kubelet, bao, generator, tmp_path):
    fifo = tmp_path / "vaulttoken"
    os.mkfifo(fifo, 0o600)
    kubelet.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] = str(fifo)
    before = len(bao.accessors())
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX, timeout=30)
    assert reply.status == "Failure" and "is not a regular file" in reply.message, reply.body
    assert reply.seconds < 15 and not is_mount_point(path)
    # Nor any other file a setting names that OpenSSL would open with a blocking read.
    kubelet.env.update(VAULTTMPFS_GENERATOR_TOKEN_PATH=generator["path"], VAULT_CACERT=str(fifo))
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX, timeout=30)
    assert reply.status == "Failure" and f"VAULT_CACERT={fifo} is not a regular file" in reply.message, reply.body
    all_clear(kubelet, bao, before)


# --- 5. a state dir someone else could write ------------------------------------------------------

def test_5_a_state_dir_owned_by_another_user_is_refused_with_the_fix(kubelet, bao):
    victim = bao.create_token(policies=["default"], ttl="10m")  # an unrelated token
    remember_secret(victim["client_token"])
    state = kubelet.root / "state"
    (state / "pending").mkdir(parents=True)
    (state / "pending" / "planted.json").write_text(json.dumps({"accessor": victim["accessor"]}))
    os.chown(state, NOBODY, NOBODY)
    try:
        result = kubelet.call_cli("retry-revocations")
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"fix it with: chown root {os.path.realpath(state)}" in result.stderr
        assert bao.lookup_accessor(victim["accessor"]) is not None  # not revoked on a planter's say
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.status == "Failure" and f"chown root {os.path.realpath(state)}" in reply.message, reply.body
        assert not is_mount_point(path)
    finally:
        bao.revoke_token(victim["client_token"])


def test_5_a_group_writable_parent_of_the_state_dir_is_refused(kubelet, bao):
    parent = kubelet.root / "shared"
    parent.mkdir()
    parent.chmod(0o777)  # not sticky: anyone may swap the state dir for one of their own
    kubelet.env["VAULTTMPFS_STATE_DIR"] = str(parent / "state")
    before = len(bao.accessors())
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.status == "Failure" and f"chmod go-w {os.path.realpath(parent)}" in reply.message, reply.body
    assert not is_mount_point(path) and len(bao.accessors()) == before


# --- 6. unmount finds the token from every source -------------------------------------------------

@pytest.mark.parametrize("unwrap", [False, True], ids=["wrapped", "unwrapped"])
def test_6_a_corrupt_record_does_not_lose_the_token(kubelet, bao, unwrap):
    before = len(bao.accessors())
    reply, path = kubelet.mount(kubelet.new_pod(), {**NGINX, "vault/unwrap": str(unwrap).lower()})
    assert reply.ok, reply.body
    meta = json.loads((path / "vault-token.json").read_text())
    remember_secret((path / "vault-token").read_text())
    accessor = meta["accessor"] if unwrap else meta["wrapped_accessor"]
    [record] = (kubelet.root / "state" / "volumes").glob("*.json")
    record.write_text('{"accessor": "trunc')
    reply = kubelet.teardown(path)
    assert reply.ok and f"token revoked (accessor {accessor})" in reply.message, reply.body
    assert bao.lookup_accessor(accessor) is None
    assert len(list((kubelet.root / "state" / "corrupt").glob("*.json"))) == 1  # kept for an operator
    all_clear(kubelet, bao, before)


def test_6_mount_through_a_symlinked_root_and_unmount_through_the_real_path(bao, generator, driver_cmd, tmp_path,
                                                                            log_dir):
    root = tmp_path / "node"
    (root / "disk" / "kubelet").mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)
    (root / "var" / "lib" / "kubelet").symlink_to(root / "disk" / "kubelet")
    kubelet = Kubelet(driver_cmd, driver_env(bao, generator, root, log_dir), root)
    try:
        before = len(bao.accessors())
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.ok, reply.body
        wrap = read_wrap(path)
        real = Path(os.path.realpath(path))
        assert real != path and str(real).startswith(str(root / "disk"))
        reply = kubelet.unmount(real)
        assert reply.ok and "token revoked" in reply.message, reply.body
        assert bao.lookup_accessor(wrap["wrapped_accessor"]) is None
        all_clear(kubelet, bao, before)
    finally:
        unmount_everything_under(root)


# --- 7. a symlink swapped in between the checks and mount(2) --------------------------------------

def test_7_a_symlink_swapped_in_before_mount_cannot_move_the_tmpfs(faulty, fault, bao):
    before = len(bao.accessors())
    pod = faulty.new_pod()
    path = faulty.volume_dir(pod)
    fault.add(CREATE, "delay", times=1)  # the checks are done; mount(2) comes after Vault answers
    proc = start(faulty, "mount", str(path), json.dumps(faulty.options(pod, "token", NGINX)))
    assert fault.arrived.wait(60)
    outside = faulty.root / "outside"
    (outside / "token").mkdir(parents=True)
    plugin_dir = path.parent
    plugin_dir.rename(plugin_dir.with_name("moved-away"))
    plugin_dir.symlink_to(outside)
    fault.release.set()
    reply = finish(proc)
    assert reply["status"] == "Failure" and "swapped for a symlink" in reply["message"], reply
    assert not is_mount_point(outside / "token")
    plugin_dir.unlink()
    plugin_dir.with_name("moved-away").rename(plugin_dir)
    assert faulty.unmount(path).ok
    all_clear(faulty, bao, before)


# --- 8. a relayed call sees only the settings the driver forwarded --------------------------------

@pytest.fixture
def mtls_node(mtls_bao, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    env = driver_env(mtls_bao["server"], mtls_bao["generator"], root, log_dir, VAULT_ADDR=mtls_bao["addr"],
                     VAULT_CACERT=str(mtls_bao["pki"] / "ca.pem"))
    node = Kubelet(driver_cmd, env, root)
    yield node
    unmount_everything_under(root)


def test_8_a_relayed_call_does_not_use_the_agents_client_certificate(mtls_node, mtls_bao, driver_cmd,
                                                                     log_dir, tmp_path):
    pki = mtls_bao["pki"]
    cert = {"VAULT_CLIENT_CERT": str(pki / "client.pem"), "VAULT_CLIENT_KEY": str(pki / "client.key")}
    agent = AgentProcess.relaying(driver_cmd, {**mtls_node.env, **cert}, log_dir / f"{tmp_path.name}-agent.log")
    try:
        # The kubelet configured the driver without a client certificate: refused, as it is without an agent.
        reply, path = mtls_node.mount(mtls_node.new_pod(), NGINX)
        assert reply.status == "Failure" and mtls_node.env["VAULT_ADDR"] in reply.message, reply.body
        assert len(agent.relayed("mount")) == 1 and not is_mount_point(path)
        # Configured with one, the relayed call presents the driver's.
        mtls_node.env.update(cert)
        reply, path = mtls_node.mount(mtls_node.new_pod(), NGINX)
        assert reply.ok and len(agent.relayed("mount")) == 2, reply.body
        wrap = read_wrap(path)
        assert mtls_node.teardown(path).ok
        assert mtls_bao["server"].lookup_accessor(wrap["wrapped_accessor"]) is None
    finally:
        agent.stop()


# --- 9. unusual bytes in paths --------------------------------------------------------------------

def mounts_below(root: Path) -> list[bytes]:
    """Mount points below `root`, decoded from mountinfo's escapes (a space is \\040 there)."""
    prefix = os.fsencode(os.path.realpath(root)) + b"/"
    targets = (re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4])
               for line in Path("/proc/self/mountinfo").read_bytes().splitlines())
    return [target for target in targets if target.startswith(prefix)]


def unmount_escaped_under(root: Path) -> None:
    """conftest's cleanup, for paths with escaped bytes: a red run leaves nothing mounted."""
    for target in mounts_below(root):
        subprocess.run([b"umount", b"-l", target], check=False)


def test_9_a_pods_dir_with_a_space_and_non_ascii_mounts_and_unmounts(bao, generator, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "nœud de test"
    root.mkdir()
    kubelet = Kubelet(driver_cmd, driver_env(bao, generator, root, log_dir), root)
    try:
        before = len(bao.accessors())
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.ok, reply.body
        wrap = read_wrap(path)
        assert mounts_below(root) == [os.fsencode(path)]
        reply = kubelet.teardown(path)
        assert reply.ok and "token revoked" in reply.message, reply.body
        assert bao.lookup_accessor(wrap["wrapped_accessor"]) is None
        assert mounts_below(root) == []
        all_clear(kubelet, bao, before)
    finally:
        unmount_escaped_under(root)


def test_9_unmount_of_a_never_mounted_dir_with_non_utf8_bytes_succeeds(kubelet):
    pod = kubelet.new_pod()
    odd = os.fsdecode(os.fsencode(str(kubelet.volume_dir(pod, create=False).parent)) + b"/tok\xffen")
    os.makedirs(odd)
    reply = kubelet.unmount(Path(odd))
    assert reply.ok and "nothing to revoke" in reply.message, reply.body
    assert state_records(kubelet) == []


# --- 10. the health endpoint cannot be held open ----------------------------------------------------

def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


@pytest.mark.parametrize("endpoint", ["/healthz", "/metrics"])
def test_10_idle_and_half_sent_health_connections_are_bounded(bao, generator, tmp_path, log_dir, endpoint):
    # The wait is the server's time bound: the source's agent and the build's wait it out together.
    on_source_and_build(lambda kind, driver_cmd: connections_are_bounded(bao, generator, driver_cmd,
                                                                         tmp_path / kind, log_dir, endpoint))


def connections_are_bounded(bao, generator, driver_cmd, tmp_path, log_dir, endpoint):
    root = tmp_path / "node"
    root.mkdir(parents=True)
    env = driver_env(bao, generator, root, log_dir)
    metrics_port = free_port()
    with AgentProcess(driver_cmd, env, "--retry-interval", "1h", "--metrics-addr",
                     f"127.0.0.1:{metrics_port}") as agent:
        agent.wait_for(lambda status, body: status == 200, "the agent to be healthy")
        port = agent.port if endpoint == "/healthz" else metrics_port
        base = threads_of(agent.proc.pid)
        held = []
        for i in range(300):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                conn.sendall(f"GET {endpoint} HTTP/1.1\r\nHost: x\r\n".encode())  # never finished
            held.append(conn)
        time.sleep(1.0)
        assert threads_of(agent.proc.pid) <= base + 16
        # Every one of them is cut by the server within its time bound, and requests are answered again.
        deadline = time.monotonic() + 15
        for conn in held:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                assert conn.recv(1024) == b""
            except ConnectionResetError:
                pass
            conn.close()
        assert wait_for(lambda: threads_of(agent.proc.pid) <= base, timeout=10)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{endpoint}", timeout=5) as response:
            assert response.status == 200
        assert agent.terminate() == 0



# The attacker: more connections than the server has slots, half idle, half sending a request byte
# by byte that never ends; each one the server cuts is opened again at once.
HELD = 100
ATTACK_ROUND = 0.05
KUBELET_PROBE_TIMEOUT = 1.0  # a probe's default timeoutSeconds


@other_user
@pytest.mark.parametrize("endpoint", ["/livez", "/metrics"])
def test_10_connections_another_user_holds_open_do_not_keep_the_probes_out(bao, generator, tmp_path, log_dir,
                                                                           endpoint):
    """uid nobody on the node (or a pod, for /metrics on the node's address) held every slot, and the
    kubelet's /livez probe failed until it restarted the agent, again and again."""
    on_source_and_build(lambda kind, driver_cmd: probes_get_through(bao, generator, driver_cmd,
                                                                    tmp_path / kind, log_dir, endpoint))


def probes_get_through(bao, generator, driver_cmd, tmp_path, log_dir, endpoint):
    root = tmp_path / "node"
    root.mkdir(parents=True)
    env = driver_env(bao, generator, root, log_dir)
    metrics_port = free_port()
    with AgentProcess(driver_cmd, env, "--retry-interval", "1h", "--metrics-addr",
                     f"127.0.0.1:{metrics_port}") as agent:
        agent.wait_for(lambda status, body: status == 200, "the agent to be healthy")
        url = f"http://127.0.0.1:{agent.port if endpoint == '/livez' else metrics_port}{endpoint}"
        base = threads_of(agent.proc.pid)
        attacker = hold_connections_as_nobody(url)
        try:
            answers = []
            for _ in range(20):  # ~5 s: every held connection has been cut and opened again by then
                time.sleep(0.25)
                answers.append(probe(url))
            assert answers == [200] * 20
            assert threads_of(agent.proc.pid) <= base  # a connection still sending costs no thread
        finally:
            os.kill(attacker, signal.SIGKILL)
            os.waitpid(attacker, 0)
        assert agent.terminate() == 0


def probe(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=KUBELET_PROBE_TIMEOUT) as response:
            return response.status
    except OSError as exc:
        return repr(exc)


def hold_connections_as_nobody(url: str) -> int:
    """The pid of a forked child, running as nobody, once it holds HELD connections to `url`'s port."""
    _, _, host_port, path = url.split("/", 3)
    port = int(host_port.rpartition(":")[2])
    unfinished = f"GET /{path} HTTP/1.1\r\nHost: x\r\n".encode()  # no blank line: never complete
    arm_death_signal = dies_with_parent()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only syscalls until it is killed
        try:
            arm_death_signal()
            become(NOBODY)
            keep_connections_open(port, unfinished, ready_write)
        finally:
            os._exit(1)
    os.close(ready_write)
    with os.fdopen(ready_read, "rb") as ready:
        assert ready.read(1) == b"1", "the attacker could not open its connections"
    return pid


def keep_connections_open(port: int, unfinished: bytes, ready_fd: int) -> None:
    held: list[list] = []  # [socket, bytes sent so far, sends byte by byte]
    while True:
        held = [entry for entry in held if still_open(entry[0])]
        while len(held) < HELD:
            conn = socket.socket()
            conn.connect(("127.0.0.1", port))
            conn.setblocking(False)
            held.append([conn, 0, len(held) % 2 == 1])
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
            ready_fd = None
        for entry in held:
            conn, sent, slowly = entry
            if slowly and sent < len(unfinished):
                try:
                    entry[1] += conn.send(unfinished[sent:sent + 1])
                except OSError:
                    pass  # cut: seen next round
        time.sleep(ATTACK_ROUND)


def still_open(conn: socket.socket) -> bool:
    try:
        if conn.recv(1) == b"":
            conn.close()
            return False
    except BlockingIOError:
        return True
    except OSError:
        conn.close()
        return False
    conn.close()  # answered: not what this client wants
    return False


# --- also seen by a first-time operator -----------------------------------------------------------

def test_a_client_timeout_in_milliseconds_is_a_duration(kubelet, bao):
    kubelet.env["VAULT_CLIENT_TIMEOUT"] = "1500ms"
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    read_wrap(path)
    assert kubelet.teardown(path).ok


@pytest.mark.parametrize("setting, value", [("VAULTTMPFS_TMPFS_SIZE", "999g"), ("VAULTTMPFS_TMPFS_SIZE", "50%"),
                                            ("VAULT_MAX_RETRIES", "-5"), ("VAULT_MAX_RETRIES", "1000"),
                                            ("VAULT_CLIENT_TIMEOUT", "0")])
def test_settings_outside_a_sane_range_are_refused_by_name(kubelet, bao, setting, value):
    kubelet.env[setting] = value
    before = len(bao.accessors())
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.status == "Failure" and reply.message.startswith(f"{setting}={value!r}"), reply.body
    assert not is_mount_point(path) and len(bao.accessors()) == before


def driver_log(kubelet: Kubelet) -> list[dict]:
    path = Path(kubelet.env["VAULTTMPFS_LOG_FILE"])
    mine = str(kubelet.pods_dir) + "/"
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [line for line in lines if str(line.get("dir", "")).startswith(mine)]


def test_every_call_logs_one_outcome_line_and_the_admitted_pod_uid(kubelet, bao):
    pod = kubelet.new_pod("web", namespace="shop")
    options = json.dumps({k: v for k, v in kubelet.options(pod, "token", NGINX).items()
                          if k != "kubernetes.io/pod.uid"})  # the uid comes from the path, not an option
    path = kubelet.volume_dir(pod)
    assert kubelet.call("mount", str(path), options).ok
    wrap = read_wrap(path)
    refused = kubelet.call("mount", str(kubelet.volume_dir(kubelet.new_pod())), '{"vault/policies": "root"}')
    assert refused.status == "Failure"
    assert kubelet.teardown(path).ok
    outcomes = [line for line in driver_log(kubelet) if line["event"] == "driver call"]
    assert [(o["verb"], o["result"]) for o in outcomes] == [("mount", "Success"), ("mount", "Failure"),
                                                             ("unmount", "Success")]
    assert outcomes[0]["pod"] == "shop/web" and outcomes[0]["pod_uid"] == pod.uid and outcomes[0]["ms"] > 0
    assert outcomes[1]["error"] == refused.message and outcomes[1]["level"] == "warning"
    [mounted] = [line for line in driver_log(kubelet) if line["event"] == "mounted"]
    assert mounted["pod_uid"] == pod.uid and mounted["accessor"] == wrap["wrapped_accessor"]


def test_a_mistyped_command_gets_a_usage_error_and_kubelet_calls_get_json(kubelet):
    typo = kubelet.call_cli("bootsrap")
    assert typo.returncode == 2 and "No such command 'bootsrap'" in typo.stderr and typo.stdout == ""
    for argv in (["getvolumename", '{"kubernetes.io/fsType":""}'], ["attach", "{}", "node-1"],
                 ["waitforattach", "/dev/x", "{}"], ["isattached", "{}", "node-1"],
                 ["mountdevice", "/var/lib/kubelet/x", "/dev/x", "{}"], ["unmountdevice", "/var/lib/kubelet/x"],
                 ["expandvolume", "{}", "1", "2"], ["detach", "dev", "node-1"],
                 ["newverb", "/var/lib/kubelet/x"]):
        reply = kubelet.call(*argv)
        assert reply.status == "Not supported" and reply.exit_code == 0, argv
    assert kubelet.init().ok
