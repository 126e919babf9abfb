"""The fast path (vaulttmpfs/relay.py): the kubelet execs the driver, the driver hands mount/unmount
to a running `vaulttmpfs agent --relay`, against real OpenBao and real tmpfs.

Every test runs against the source tree and the PyInstaller build (agent and driver alike).
Which path a call took is read from the agent's log ("relayed" events) and the driver's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vaulttmpfs.config import Config
from vaulttmpfs.engine.state import StateStore
from vaulttmpfs.flexvolume import relay

from .agents import AgentProcess
from .conftest import remember_secret
from .kubelet import is_mount_point, mount_entry
from .otheruser import NOBODY, become, other_user, shared_dir

NGINX = {"vault/policies": "nginx"}


@pytest.fixture
def node(kubelet, tmp_path):
    """The kubelet with its agent socket in the test's own dir (never the machine's /run)."""
    kubelet.env["VAULTTMPFS_AGENT_SOCKET"] = str(tmp_path / "run" / "vaulttmpfs" / "agent.sock")
    return kubelet


@pytest.fixture
def start_agent(node, driver_cmd, log_dir, tmp_path):
    agents: list[AgentProcess] = []

    def start(env: dict[str, str] | None = None, wrap: list[str] | None = None) -> AgentProcess:
        agent = AgentProcess.relaying(driver_cmd, env or node.env, log_dir / f"{tmp_path.name}-agent{len(agents)}.log",
                                      wrap)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()


def driver_events(kubelet, event: str) -> list[dict]:
    """The driver's own log lines about this test's volumes (the log file is shared between tests)."""
    path = Path(kubelet.env["VAULTTMPFS_LOG_FILE"])
    if not path.exists():
        return []
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    mine = str(kubelet.pods_dir) + "/"
    return [line for line in lines if line.get("event") == event and str(line.get("dir", "")).startswith(mine)]


def volume_facts(path: Path) -> dict:
    """What a pod sees: files, modes, owners, mount options (token values differ between mounts)."""
    entry = mount_entry(path)
    files = {}
    for name in sorted(os.listdir(path)):
        info = (path / name).stat()
        files[name] = (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
    return {"files": files, "fstype": entry["fstype"], "source": entry["source"],
            "options": sorted(set(entry["options"]) - {"relatime", "noatime"}),
            "super_options": sorted(o for o in entry["super_options"] if not o.startswith("inode64"))}


def unwrapped(bao, path: Path) -> dict:
    token = remember_secret((path / "vault-token").read_text())
    auth = bao.unwrap(token)["auth"]
    remember_secret(auth["client_token"])
    return auth


def test_mount_and_unmount_go_through_the_agent(node, start_agent, bao):
    agent = start_agent()
    pod = node.new_pod("web")
    reply, path = node.mount(pod, NGINX)
    assert reply.ok and reply.exit_code == 0, reply.body
    assert reply.body == {"status": "Success", "message": "token for policies nginx mounted"}
    assert is_mount_point(path) and (path / "vault-token").is_file()
    accessor = json.loads((path / "vault-token.json").read_text())["wrapped_accessor"]

    [relayed] = agent.relayed("mount")
    assert relayed["dir"] == str(path) and relayed["exit_code"] == 0
    assert not driver_events(node, "mounted")  # the driver process did not mount it itself

    assert node.teardown(path).ok
    [relayed] = agent.relayed("unmount")
    assert relayed["dir"] == str(path) and relayed["exit_code"] == 0
    assert bao.lookup_accessor(accessor) is None  # the agent revoked the pod's token
    assert not driver_events(node, "unmounted")


def test_relayed_volume_is_identical_to_an_in_process_one(node, start_agent, bao):
    """Same files, modes, owners, mount options, token policies and metadata either way."""
    pod_direct = node.new_pod("web", namespace="shop", service_account="api")
    direct, direct_path = node.mount(pod_direct, NGINX, fs_group=2000)
    assert direct.ok, direct.body
    agent = start_agent()
    pod_relayed = node.new_pod("web", namespace="shop", service_account="api")
    relayed, relayed_path = node.mount(pod_relayed, NGINX, fs_group=2000)
    assert relayed.ok, relayed.body
    assert len(agent.relayed("mount")) == 1

    assert relayed.body == direct.body
    assert volume_facts(relayed_path) == volume_facts(direct_path)
    auths = [unwrapped(bao, p) for p in (direct_path, relayed_path)]
    assert auths[0]["policies"] == auths[1]["policies"] == ["default", "nginx"]
    for auth, pod in zip(auths, (pod_direct, pod_relayed), strict=True):
        assert auth["metadata"]["pod_uid"] == pod.uid
        # The driver's host name, not the agent's (they differ when the agent is in a pod).
        assert auth["metadata"]["node"] == os.uname().nodename
    assert {k: v for k, v in auths[0]["metadata"].items() if k != "pod_uid"} == \
        {k: v for k, v in auths[1]["metadata"].items() if k != "pod_uid"}
    assert node.teardown(relayed_path).ok and node.teardown(direct_path).ok


def test_the_kubelets_settings_travel_with_the_call(node, start_agent, bao):
    """The agent acts on the settings the kubelet gave the driver, not on its own."""
    agent_env = dict(node.env)
    agent = start_agent(agent_env)
    node.env.update({"VAULTTMPFS_TOKEN_FILENAME": "token", "VAULT_WRAP_TTL": "2m", "VAULTTMPFS_NODE_NAME": "node-7"})
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert len(agent.relayed("mount")) == 1
    assert sorted(os.listdir(path)) == ["token", "token.json"]
    wrap_info = json.loads((path / "token.json").read_text())
    assert wrap_info["ttl"] == 120
    auth = bao.unwrap(remember_secret((path / "token").read_text()))["auth"]
    remember_secret(auth["client_token"])
    assert auth["metadata"]["node"] == "node-7"
    assert node.teardown(path).ok


def test_without_an_agent_the_driver_mounts_by_itself(node):
    assert not os.path.exists(node.env["VAULTTMPFS_AGENT_SOCKET"])
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert len(driver_events(node, "mounted")) == 1
    assert node.teardown(path).ok


def test_a_dead_agents_stale_socket_means_the_driver_mounts_by_itself(node, start_agent):
    agent = start_agent()
    agent.kill()  # SIGKILL: the socket file stays behind
    assert stat.S_ISSOCK(os.stat(node.env["VAULTTMPFS_AGENT_SOCKET"]).st_mode)
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert len(driver_events(node, "mounted")) == 1
    assert node.teardown(path).ok
    assert len(driver_events(node, "unmounted")) == 1


def test_a_stopped_agent_is_bypassed_and_never_acts_on_the_call_later(node, start_agent, bao):
    """An agent that does not say hello in time never got the call: the driver does it, once."""
    agent = start_agent()
    before = set(bao.accessors())
    os.killpg(agent.proc.pid, signal.SIGSTOP)
    try:
        reply, path = node.mount(node.new_pod(), NGINX, timeout=60)
    finally:
        os.killpg(agent.proc.pid, signal.SIGCONT)
    assert reply.ok, reply.body
    assert reply.seconds < 30  # bounded: the handshake timeout, not the kubelet's patience
    assert len(driver_events(node, "mounted")) == 1
    # Woken up, the agent finds the connection the driver gave up on and drops it unacted.
    agent.wait_for_event("relay call dropped before it started")
    assert agent.relayed() == []
    assert len(set(bao.accessors()) - before) == 2  # one pod token and its wrapping token, not two pairs
    assert node.teardown(path).ok


def test_an_agent_that_dies_after_taking_the_call_is_not_redone(node, start_agent, bao):
    """Past the commit point the driver never mints itself: a second token could be the result."""
    agent = start_agent()
    pod = node.new_pod()
    path = node.volume_dir(pod)
    before = set(bao.accessors())
    # Hold the volume's lock, so the agent's worker waits inside the mount, then kill the agent.
    store = StateStore(node.env["VAULTTMPFS_STATE_DIR"])
    with store.locked(str(path)):
        lock_file = Path(store.volumes) / f"{store.key(str(path))}.lock"
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(node.mount, pod, NGINX, timeout=120)
            wait_for_lock_waiter(agent.proc.pid, lock_file)
            agent.kill()
            reply, _ = pending.result()
    assert reply.status == "Failure" and reply.exit_code == 1, reply.body
    assert "took the call but did not answer" in reply.message and "not redone" in reply.message
    assert not is_mount_point(path)
    assert not driver_events(node, "mounted")
    assert set(bao.accessors()) == before  # nothing minted by anyone
    # The kubelet calls again; without an agent the driver does it now.
    reply, path = node.mount(pod, NGINX)
    assert reply.ok, reply.body
    assert node.teardown(path).ok


def wait_for_lock_waiter(pid: int, lock_file: Path, timeout: float = 60.0) -> None:
    """Until /proc/locks shows `pid` blocked on the flock of `lock_file` (bounded, not a speed test)."""
    inode = f":{os.stat(lock_file).st_ino}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # "N: -> FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF" for a waiter
            at = fields.index("->") if "->" in fields else -1
            if at >= 0 and fields[at + 4] == str(pid) and fields[at + 5].endswith(inode):
                return
        time.sleep(0.05)
    raise AssertionError(f"the agent (pid {pid}) never waited on {lock_file}")


def test_a_mount_the_kubelet_cannot_see_is_undone_and_reported(node, start_agent, bao):
    """An agent in its own mount namespace (no Bidirectional propagation) mounts where no pod looks."""
    agent = start_agent(wrap=["unshare", "--mount", "--propagation", "private"])
    before = set(bao.accessors())
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.status == "Failure", reply.body
    assert "kubelet cannot see that mount (undone)" in reply.message
    assert "mountPropagation: Bidirectional" in reply.message
    assert not is_mount_point(path)
    assert [e["verb"] for e in agent.relayed()] == ["mount", "unmount"]
    [mounted] = agent.events("mounted")  # in the agent's namespace, with the token it minted
    assert bao.lookup_accessor(mounted["accessor"]) is None  # the undo revoked it...
    assert set(bao.accessors()) == before  # ...and its wrapping token: nothing minted is left alive
    assert node.teardown(path).ok


def test_concurrent_calls_through_the_agent(node, start_agent):
    """A burst of pods on a node that never mounted before (no cached generator check yet)."""
    agent = start_agent()
    pods = [node.new_pod(f"p{i}") for i in range(12)]
    with ThreadPoolExecutor(len(pods)) as pool:
        results = list(pool.map(lambda p: node.mount(p, NGINX), pods))
    assert all(reply.ok for reply, _ in results), [r.body for r, _ in results if not r.ok]
    tokens = {(path / "vault-token").read_text() for _, path in results}
    assert len(tokens) == len(pods)
    assert len(agent.relayed("mount")) == len(pods)
    with ThreadPoolExecutor(len(pods)) as pool:
        assert all(r.ok for r in pool.map(lambda r: node.teardown(r[1]), results))
    assert len(agent.relayed("unmount")) == len(pods)


def test_socket_is_root_only_and_replaces_a_stale_one(node, start_agent):
    sock = Path(node.env["VAULTTMPFS_AGENT_SOCKET"])
    sock.parent.mkdir(parents=True, mode=0o755)
    sock.parent.chmod(0o755)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))  # left by an agent that died, nobody listening
    start_agent()
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and sock.stat().st_uid == 0
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


def test_a_second_agent_does_not_steal_the_socket(node, start_agent, driver_cmd):
    start_agent()
    second = subprocess.run([*driver_cmd, "agent", "--relay", "--health-addr", ""], env=node.env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert "another node agent already serves" in second.stdout + second.stderr
    reply, path = node.mount(node.new_pod(), NGINX)  # the first one still serves
    assert reply.ok, reply.body
    assert node.teardown(path).ok


def connect_as(uid: int, path: str) -> bytes:
    """What a process running as `uid` reads from the socket (a forked child: no exec, no PATH)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only syscalls, then _exit
        code = 0
        try:
            become(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(path)
                os.write(write_end, b"ok:" + sock.recv(64))
        except PermissionError as exc:
            os.write(write_end, f"denied:{exc}".encode())
        except BaseException as exc:  # noqa: BLE001
            os.write(write_end, f"error:{exc!r}".encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as result:
        data = result.read()
    os.waitpid(pid, 0)
    return data


@other_user
def test_a_caller_that_is_not_root_is_refused(node, start_agent):
    """Even with the socket's permissions loosened, the agent checks the caller's uid itself."""
    shared = shared_dir()  # 0700 until the agent has made its socket there
    try:
        node.env["VAULTTMPFS_AGENT_SOCKET"] = str(shared / "agent.sock")
        agent = start_agent()
        shared.chmod(0o755)
        (shared / "agent.sock").chmod(0o666)
        data = connect_as(NOBODY, str(shared / "agent.sock"))
        assert data == b"ok:", data  # connected, then closed without the banner: no call is taken
        [refused] = agent.wait_for_event("relay refused a caller that is not root")
        assert refused["peer_uid"] == NOBODY
        assert agent.relayed() == []
        # Root still gets in.
        reply, path = node.mount(node.new_pod(), NGINX)
        assert reply.ok, reply.body
        assert len(agent.relayed("mount")) == 1
        assert node.teardown(path).ok
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_relay_wire_format_round_trips():
    argv = ["mount", "/var/lib/kubelet/pods/x/volumes/v", '{"a":"b=c","n":"line\\nbreak"}']
    env = {"VAULT_ADDR": "https://vault:8200", "VAULTTMPFS_ROLE_NAME": "apps", "VAULT_TOKEN": "s.secret",
           "HOME": "/root", "NODE_NAME": "n1", "VAULT_WRAP_TTL": "a=b"}
    frame = relay.encode_request(argv, env, "host-1")
    head, _, payload = frame.partition(b"\n")
    assert int(head) == len(payload)
    decoded_argv, decoded_env, node_name = relay.decode_request(payload)
    assert decoded_argv == argv and node_name == "host-1"
    # Only the driver's settings travel, and never a VAULT_TOKEN.
    assert decoded_env == {"VAULT_ADDR": "https://vault:8200", "VAULTTMPFS_ROLE_NAME": "apps",
                           "NODE_NAME": "n1", "VAULT_WRAP_TTL": "a=b"}
    with pytest.raises(ValueError):
        relay.decode_request(b"host\x005\x00mount")
    with pytest.raises(ValueError):
        relay.decode_reply(b"0\n{\"status\": \"Succ")


def test_default_socket_is_the_configs():
    assert relay.DEFAULT_SOCKET == Config.agent_socket


def test_state_writes_from_concurrent_agent_threads_do_not_collide(tmp_path):
    """The relay runs mounts in threads of one process: a per-process temp file name would clash."""
    store = StateStore(str(tmp_path / "state"))
    errors: list[BaseException] = []

    def write_many() -> None:
        try:
            for i in range(30):
                store.write_note("generator-check", {"i": i})
        except BaseException as exc:  # noqa: BLE001 -- collected, asserted below
            errors.append(exc)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(write_many)
    assert errors == []
    assert store.read_note("generator-check")["i"] == 29


@other_user
def test_a_socket_served_by_someone_other_than_root_gets_no_call(node):
    """The driver checks the agent's uid too: an impostor's socket gets neither settings nor argv."""
    shared = shared_dir()
    shared.chmod(0o777)
    sock_path = shared / "agent.sock"
    node.env["VAULTTMPFS_AGENT_SOCKET"] = str(sock_path)
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the impostor: uid nobody, says the banner, records what it is sent
        try:
            become(NOBODY)
            with socket.socket(socket.AF_UNIX) as server:
                server.bind(str(sock_path))
                server.listen(1)
                os.write(ready_write, b"1")
                server.settimeout(30)
                conn, _ = server.accept()
                conn.settimeout(5)
                received = b""
                try:  # the driver may hang up first (then the banner write fails): that is the point
                    conn.sendall(relay.BANNER)
                    while chunk := conn.recv(65536):
                        received += chunk
                except OSError:
                    pass
                os.write(write_end, b"got:" + received)
        except BaseException as exc:  # noqa: BLE001
            os.write(ready_write, b"0")
            os.write(write_end, f"error:{exc!r}".encode())
        os._exit(0)
    os.close(write_end)
    os.close(ready_write)
    try:
        if os.read(ready_read, 1) != b"1":
            with os.fdopen(read_end, "rb") as result:
                raise AssertionError(f"the impostor could not start as uid {NOBODY}: {result.read()!r}")
        reply, path = node.mount(node.new_pod(), NGINX)
        assert reply.ok, reply.body  # done by the driver itself
        assert len(driver_events(node, "mounted")) == 1
        with os.fdopen(read_end, "rb") as result:
            assert result.read() == b"got:"  # the impostor was connected to, and sent nothing
        assert node.teardown(path).ok
    finally:
        os.waitpid(pid, 0)
        shutil.rmtree(shared, ignore_errors=True)
