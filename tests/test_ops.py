"""Day one and two for the operator: the config file, `doctor`, `status` (against real OpenBao, real
tmpfs, the driver exec'd as the kubelet does and a real agent)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .agents import AgentProcess
from .conftest import driver_env, remember_secret, source_cmd, write_config
from .kubelet import Kubelet
from .otheruser import NOBODY, become, other_user, shared_dir
from .vaultserver import REPO, closed_addr, dies_with_parent, free_port
from .volumes import fill, small_state_fs

NGINX = {"vault/policies": "nginx"}
# What the DaemonSet's ConfigMap carries; the kubelet's environment then needs none of it.
SHARED = ("VAULT_ADDR", "VAULTTMPFS_GENERATOR_TOKEN_PATH", "VAULTTMPFS_STATE_DIR", "VAULTTMPFS_PODS_DIR",
          "VAULTTMPFS_AGENT_SOCKET", "VAULT_MAX_RETRIES", "VAULT_CLIENT_TIMEOUT", "VAULTTMPFS_PLUGIN_DIR")


def split_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(what stays in the kubelet's environment, what moves into the config file)."""
    return ({k: v for k, v in env.items() if k not in SHARED}, {k: env[k] for k in SHARED if k in env})


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> str:
    """The build, installed where a kubelet would look (as the DaemonSet's install step does)."""
    target = tmp_path_factory.mktemp("plugins")
    proc = subprocess.run([*source_cmd(), "install", "--plugin-dir", str(target), "--source",
                           str(REPO / "dist" / "vaulttmpfs")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(target)


# --- the config file -------------------------------------------------------------------------

def test_config_file_is_honoured_and_the_environment_overrides_it(bao, generator, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    env, shared = split_env(driver_env(bao, generator, root, log_dir))
    config = Path(env["VAULTTMPFS_CONFIG_FILE"])
    write_config(config, {**shared, "VAULTTMPFS_TOKEN_FILENAME": "from-file"})
    node = Kubelet(driver_cmd, env, root)

    reply, path = node.mount(node.new_pod(), NGINX)  # every Vault/state setting came from the file
    assert reply.ok, reply.body
    assert (path / "from-file").is_file() and not (path / "vault-token").exists()
    assert node.unmount(path).ok

    env["VAULTTMPFS_TOKEN_FILENAME"] = "from-env"  # a kubelet drop-in still wins
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert (path / "from-env").is_file() and not (path / "from-file").exists()
    assert node.unmount(path).ok


def test_untrusted_or_malformed_config_file_refuses_mounts_but_init_answers(bao, generator, driver_cmd, tmp_path,
                                                                            log_dir):
    root = tmp_path / "node"
    root.mkdir()
    env, shared = split_env(driver_env(bao, generator, root, log_dir))
    config = Path(env["VAULTTMPFS_CONFIG_FILE"])
    node = Kubelet(driver_cmd, env, root)
    write_config(config, {**shared, "VAULT_ADDR": "http://attacker.invalid"}, mode=0o666)
    reply, path = node.mount(node.new_pod(), NGINX)
    assert not reply.ok and "must be owned by root and not group/world-writable" in reply.message
    assert f"chmod 644 {config}" in reply.message
    assert not os.path.ismount(path)
    assert node.init().ok  # init never reads the file: it runs on every plugin probe

    config.write_text("VAULT_TOKEN=s.leak\n")
    config.chmod(0o644)
    reply, _ = node.mount(node.new_pod(), NGINX)
    assert not reply.ok and "line 1: VAULT_TOKEN is not a vaulttmpfs setting" in reply.message

    config.chmod(0o644)
    config.parent.chmod(0o777)  # anyone could swap the file for their own
    write_config(config, shared)
    config.parent.chmod(0o777)
    reply, _ = node.mount(node.new_pod(), NGINX)
    assert not reply.ok and f"chmod go-w {config.parent}" in reply.message


# --- doctor ------------------------------------------------------------------------------------

class DoctorNode:
    """A healthy node: driver installed, settings in the config file, agent running, token valid."""

    def __init__(self, cmd, bao, generator, root: Path, log_dir: Path, plugin_dir: str, *agent_args: str):
        self.cmd = cmd
        base = driver_env(bao, generator, root, log_dir, VAULTTMPFS_PLUGIN_DIR=plugin_dir)
        self.env, self.shared = split_env(base)
        self.config = Path(self.env["VAULTTMPFS_CONFIG_FILE"])
        write_config(self.config, self.shared)
        self.kubelet = Kubelet(cmd, self.env, root)
        self.agent = AgentProcess(cmd, self.env, "--retry-interval", "1h", *agent_args)
        self.agent.wait_for(lambda s, b: s == 200, "a healthy agent")

    def doctor(self, *args: str, **env: str) -> tuple[int, dict, str]:
        run_env = {**self.env, "VAULTTMPFS_HEALTH_ADDR": f"127.0.0.1:{self.agent.port}", **env}
        proc = subprocess.run([*self.cmd, "doctor", "--json", *args], capture_output=True, text=True, env=run_env,
                              timeout=120)
        text = subprocess.run([*self.cmd, "doctor", *args], capture_output=True, text=True, env=run_env,
                              timeout=120).stdout if proc.returncode else ""
        return proc.returncode, json.loads(proc.stdout), text

    def stop(self) -> None:
        self.agent.__exit__()


@pytest.fixture
def doctor_node(bao, generator, tmp_path, log_dir, plugin_dir):
    root = tmp_path / "node"
    root.mkdir()
    node = DoctorNode(source_cmd(), bao, generator, root, log_dir, plugin_dir)
    yield node
    node.stop()


def statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def failed(report: dict, name: str) -> dict:
    check = next(c for c in report["checks"] if c["name"] == name)
    assert check["status"] == "FAIL", report
    assert check["fix"], check
    return check


def test_doctor_on_a_healthy_node(bao, generator, driver_cmd, tmp_path, log_dir, plugin_dir):
    root = tmp_path / "node"
    root.mkdir()
    node = DoctorNode(driver_cmd, bao, generator, root, log_dir, plugin_dir)
    try:
        code, report, _ = node.doctor()
        assert code == 0, report
        assert report["ok"] is True
        assert statuses(report) == {name: "OK" for name in (
            "config", "driver", "agent", "settings", "vault", "tls", "generator", "role", "state",
            "revocations", "unrecorded", "socket", "broker")}, report
        text = subprocess.run([*driver_cmd, "doctor"], capture_output=True, text=True, timeout=120,
                              env={**node.env, "VAULTTMPFS_HEALTH_ADDR": f"127.0.0.1:{node.agent.port}"})
        assert text.returncode == 0 and len(text.stdout.splitlines()) == 13
        assert all(line.startswith("OK ") for line in text.stdout.splitlines()), text.stdout
        assert generator["token"] not in text.stdout + json.dumps(report)
    finally:
        node.stop()


def test_doctor_reports_drift_between_the_config_file_and_the_environment(doctor_node):
    code, report, text = doctor_node.doctor(VAULTTMPFS_STATE_DIR=str(doctor_node.config.parent / "other-state"))
    assert code == 1
    check = failed(report, "settings")
    assert "state_dir: driver" in check["detail"] and str(doctor_node.config) in check["fix"]
    assert "FAIL settings:" in text and "-- fix:" in text


@pytest.mark.parametrize("name, env, expect", [
    ("config", {"VAULTTMPFS_LOG_LEVEL": "loud"}, "VAULTTMPFS_LOG_LEVEL"),
    ("driver", {"VAULTTMPFS_PLUGIN_DIR": "/nonexistent-plugins"}, "vaulttmpfs install"),
    ("agent", {"VAULTTMPFS_HEALTH_ADDR": "CLOSED"}, "start the node agent"),
    ("vault", {"VAULT_ADDR": "http://CLOSED"}, "VAULT_ADDR"),
    ("tls", {"VAULT_SKIP_VERIFY": "true", "VAULTTMPFS_ALLOW_INSECURE": "true"}, "VAULT_CACERT"),
    ("role", {"VAULTTMPFS_ROLE_NAME": "no-such-role"}, "auth/token/roles/no-such-role"),
])
def test_doctor_names_the_fix_for_each_broken_setting(doctor_node, name, env, expect):
    closed = closed_addr()[7:]  # a port nobody listens on, picked now
    code, report, text = doctor_node.doctor(**{k: v.replace("CLOSED", closed) for k, v in env.items()})
    assert code == 1, report
    assert expect in failed(report, name)["fix"] + failed(report, name)["detail"]
    assert f"FAIL {name}:" in text


def test_doctor_broken_files(doctor_node, bao, tmp_path):
    token_path = Path(doctor_node.shared["VAULTTMPFS_GENERATOR_TOKEN_PATH"])
    token_path.chmod(0o644)
    try:
        code, report, _ = doctor_node.doctor()
        assert code == 1 and "chmod 600" in failed(report, "generator")["detail"]
    finally:
        token_path.chmod(0o600)

    original = token_path.read_text()
    try:
        token_path.write_text(bao.root_token)  # a lab shortcut the driver refuses too
        code, report, _ = doctor_node.doctor()
        assert code == 1 and "a root token" in failed(report, "generator")["detail"]
        short = bao.generator_token(ttl="90s")  # not renewed in time: minutes from refusing every mount
        token_path.write_text(remember_secret(short["client_token"]))
        code, report, _ = doctor_node.doctor()
        check = failed(report, "generator")
        assert code == 1 and "about to expire" in check["detail"] and "token_generator" in check["detail"]
        bao.revoke_token(short["client_token"])
    finally:
        token_path.write_text(original)

    state = Path(doctor_node.shared["VAULTTMPFS_STATE_DIR"])
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    code, report, _ = doctor_node.doctor()
    assert code == 1 and "chmod 700" in failed(report, "state")["fix"]
    state.chmod(0o700)

    bindings = tmp_path / "bindings.json"
    bindings.write_text(json.dumps({"bindings": [{"namespaces": ["*"], "policies": ["nginx", "payroll"]}]}))
    code, report, _ = doctor_node.doctor(VAULTTMPFS_POLICY_BINDINGS=str(bindings))
    check = failed(report, "role")
    assert code == 1 and "payroll" in check["detail"] and "nginx" not in check["detail"].split("allow ")[1]

    stale = socket.socket(socket.AF_UNIX)
    Path(doctor_node.shared["VAULTTMPFS_AGENT_SOCKET"]).parent.mkdir(parents=True, exist_ok=True)
    stale.bind(doctor_node.shared["VAULTTMPFS_AGENT_SOCKET"])
    stale.close()  # left behind by a killed agent: nobody answers there
    code, report, _ = doctor_node.doctor()
    assert code == 1 and "stale socket" in failed(report, "socket")["fix"]
    os.unlink(doctor_node.shared["VAULTTMPFS_AGENT_SOCKET"])

    broker_socket = {**doctor_node.env, **doctor_node.shared}["VAULTTMPFS_BROKER_SOCKET"]
    stale = socket.socket(socket.AF_UNIX)
    Path(broker_socket).parent.mkdir(parents=True, exist_ok=True)
    stale.bind(broker_socket)
    stale.close()
    code, report, _ = doctor_node.doctor()
    check = failed(report, "broker")
    assert code == 1 and "stale socket" in check["fix"] and "fall back to standalone" in check["detail"]
    os.unlink(broker_socket)
    assert doctor_node.doctor()[0] == 0  # everything put back: healthy again


def test_doctor_sees_a_full_or_read_only_state_dir(doctor_node):
    with small_state_fs(Path(doctor_node.shared["VAULTTMPFS_STATE_DIR"]).parent, size="4m") as state:
        code, report, _ = doctor_node.doctor()
        assert code == 0 and "MiB free" in next(c for c in report["checks"] if c["name"] == "state")["detail"]
        fill(state)
        code, report, _ = doctor_node.doctor()
        check = failed(report, "state")
        assert code == 1 and "is full (0 KiB" in check["detail"] and "cannot queue a revocation" in check["detail"]
        assert str(state) in check["fix"]
        (state / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        code, report, _ = doctor_node.doctor()
        assert code == 1 and "read-only filesystem" in failed(report, "state")["detail"]


def test_doctor_sees_the_agents_broker(bao, generator, tmp_path, log_dir, plugin_dir):
    """The plain DaemonSet's agent brokers the driver's Vault calls: doctor says the fast path is on,
    and a broker that stopped answering is a FAIL (each call would fall back to standalone)."""
    root = tmp_path / "node"
    root.mkdir()
    node = DoctorNode(source_cmd(), bao, generator, root, log_dir, plugin_dir, "--broker")
    try:
        code, report, _ = node.doctor()
        check = next(c for c in report["checks"] if c["name"] == "broker")
        assert code == 0 and check["status"] == "OK", report
        assert "go through the agent" in check["detail"]
        os.kill(node.agent.proc.pid, signal.SIGSTOP)  # the socket is there, nobody answers it
        try:
            code, report, _ = node.doctor(VAULTTMPFS_HEALTH_ADDR="127.0.0.1:1")
            check = failed(report, "broker")
            assert code == 1 and "does not answer" in check["detail"]
        finally:
            os.kill(node.agent.proc.pid, signal.SIGCONT)
    finally:
        node.stop()


# --- status, and a revocation left pending ---------------------------------------------------

def test_status_lists_volumes_and_pending_revocations_and_doctor_flags_them(doctor_node, bao):
    node = doctor_node.kubelet
    web = node.new_pod("web", "shop", "shop-sa")
    reply, web_path = node.mount(web, NGINX)
    assert reply.ok, reply.body
    reply, api_path = node.mount(node.new_pod("api", "shop"), {"vault/policies": "nginx,other"})
    assert reply.ok, reply.body

    proc = subprocess.run([*doctor_node.cmd, "status", "--json"], capture_output=True, text=True,
                          env=doctor_node.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    volumes = {v["pod"]: v for v in report["volumes"]}
    assert set(volumes) == {"web", "api"} and report["pending"] == []
    assert volumes["web"]["namespace"] == "shop" and volumes["web"]["policies"] == ["nginx"]
    assert volumes["api"]["policies"] == ["nginx", "other"] and volumes["web"]["mounted"] is True
    assert len(volumes["web"]["accessor"]) == 8 and 0 <= volumes["web"]["age_seconds"] < 120
    accessor = json.loads((web_path / "vault-token.json").read_text())["wrapped_accessor"]
    assert accessor.startswith(volumes["web"]["accessor"])

    outage = {**doctor_node.env, "VAULT_ADDR": closed_addr()}  # the kubelet's env wins over the file
    assert node.unmount(web_path, env=outage).ok  # unmounted; revocation queued
    report = json.loads(subprocess.run([*doctor_node.cmd, "status", "--json"], capture_output=True, text=True,
                                       env=doctor_node.env, timeout=60).stdout)
    assert [v["pod"] for v in report["volumes"]] == ["api"]
    assert [p["pod_uid"] for p in report["pending"]] == [web.uid, web.uid]  # pod token and its wrapping token
    text = subprocess.run([*doctor_node.cmd, "status"], capture_output=True, text=True, env=doctor_node.env,
                          timeout=60).stdout
    assert "1 volume(s), 2 pending revocation(s)" in text and "api" in text

    code, doctor_report, _ = doctor_node.doctor()
    assert code == 1 and "retry-revocations" in failed(doctor_report, "revocations")["fix"]
    retry = subprocess.run([*doctor_node.cmd, "retry-revocations"], capture_output=True, text=True,
                           env=doctor_node.env, timeout=60)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert bao.lookup_accessor(accessor) is None
    assert node.unmount(api_path).ok
    assert doctor_node.doctor()[0] == 0


def configmap_volume(directory: Path, data: dict[str, str]) -> None:
    """A ConfigMap as the kubelet mounts it: KEY -> ..data/KEY -> ..<timestamp>/KEY."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        entry.unlink() if entry.is_symlink() or entry.is_file() else None
    version = directory / f"..2026_{len(list(directory.glob('..2026_*')))}"
    version.mkdir()
    for key, value in data.items():
        (version / key).write_text(value)
        os.symlink(f"..data/{key}", directory / key)
    os.symlink(version.name, directory / "..data")


def test_install_writes_the_config_file_from_the_configmap(bao, generator, driver_cmd, tmp_path, log_dir,
                                                           plugin_dir):
    root = tmp_path / "node"
    root.mkdir()
    env, shared = split_env(driver_env(bao, generator, root, log_dir))
    configmap = tmp_path / "configmap"
    configmap_volume(configmap, {**shared, "VAULTTMPFS_TOKEN_FILENAME": "from-configmap"})
    install = [*driver_cmd, "install", "--plugin-dir", plugin_dir, "--source", str(REPO / "dist" / "vaulttmpfs")]
    run = lambda: subprocess.run(install, env={**env, "VAULTTMPFS_CONFIG_FROM": str(configmap)},  # noqa: E731
                                 capture_output=True, text=True, timeout=120)
    proc = run()
    assert proc.returncode == 0, proc.stderr
    config = Path(env["VAULTTMPFS_CONFIG_FILE"])
    assert f"config file {config}: written" in proc.stdout
    info = config.stat()
    assert (info.st_uid, info.st_mode & 0o777) == (0, 0o644)
    assert "..data" not in config.read_text()
    assert "config file" in run().stdout and ": unchanged" in run().stdout

    node = Kubelet(driver_cmd, env, root)  # the kubelet's environment carries none of the settings
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert (path / "from-configmap").is_file()
    assert node.unmount(path).ok

    before = config.read_text()
    configmap_volume(configmap, {**shared, "VAULT_TOKEN": "s.not-here"})  # refused before the node sees it
    proc = run()
    assert proc.returncode == 1 and "VAULT_TOKEN is not a vaulttmpfs setting" in proc.stderr
    assert config.read_text() == before


@pytest.mark.parametrize("key, value", [("VAULT_WRAP_TTL", "5 minutes"), ("VAULTTMPFS_TMPFS_SIZE", "1t"),
                                        ("VAULT_MAX_RETRIES", "many"), ("VAULTTMPFS_TOKEN_FILENAME", "../x")])
def test_install_refuses_a_configmap_value_the_driver_would_refuse_and_the_node_keeps_working(
        bao, generator, driver_cmd, tmp_path, log_dir, plugin_dir, key, value):
    """A typo in the ConfigMap written over the node's file would fail every kubelet call there, the
    unmount of a running pod too (its token then outlives it): install refuses it before writing."""
    root = tmp_path / "node"
    root.mkdir()
    env, shared = split_env(driver_env(bao, generator, root, log_dir))
    configmap = tmp_path / "configmap"
    configmap_volume(configmap, shared)
    install = [*driver_cmd, "install", "--plugin-dir", plugin_dir, "--source", str(REPO / "dist" / "vaulttmpfs"),
               "--config-from", str(configmap)]
    run = lambda: subprocess.run(install, env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run().returncode == 0
    config = Path(env["VAULTTMPFS_CONFIG_FILE"])
    good = config.read_text()
    node = Kubelet(driver_cmd, env, root)
    reply, running = node.mount(node.new_pod("running", "shop"), NGINX)
    assert reply.ok, reply.body
    accessor = json.loads((running / "vault-token.json").read_text())["wrapped_accessor"]

    configmap_volume(configmap, {**shared, key: value})
    proc = run()
    assert proc.returncode == 1
    assert f"{key}=" in proc.stderr and "the config file was not written" in proc.stderr, proc.stderr
    assert config.read_text() == good
    assert node.unmount(running).ok and bao.lookup_accessor(accessor) is None
    reply, path = node.mount(node.new_pod("next", "shop"), NGINX)
    assert reply.ok, reply.body
    assert node.unmount(path).ok


def test_a_failed_bundle_install_leaves_the_config_file_as_it_was(tmp_path):
    """The config file is written once the bundle is in place: an install that failed changes nothing."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VAULTTMPFS_CONFIG_FILE": str(tmp_path / "etc" / "config.env")}
    configmap = tmp_path / "configmap"
    configmap_volume(configmap, {"VAULT_ADDR": "https://vault.example:8200"})
    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    proc = subprocess.run([*source_cmd(), "install", "--plugin-dir", str(tmp_path / "plugins"), "--source",
                           str(not_a_bundle), "--config-from", str(configmap)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "is not a vaulttmpfs bundle" in proc.stderr, proc.stderr
    assert not (tmp_path / "etc" / "config.env").exists()


@pytest.mark.parametrize("loosen", ["chmod 0666", "chown nobody"])
def test_install_takes_back_a_config_file_someone_loosened_even_when_its_content_is_the_same(tmp_path, loosen):
    """The driver refuses a config file others could have written; install sets it back to root's 0644
    (as it does the bundle and the driver dir) instead of failing on every restart of the init container."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VAULTTMPFS_CONFIG_FILE": str(tmp_path / "etc" / "config.env")}
    (tmp_path / "etc").mkdir(mode=0o755)
    configmap = tmp_path / "configmap"
    configmap_volume(configmap, {"VAULT_ADDR": "https://vault.example:8200"})
    install = [*source_cmd(), "install", "--plugin-dir", str(tmp_path / "plugins"), "--source",
               str(REPO / "dist" / "vaulttmpfs"), "--config-from", str(configmap)]
    run = lambda: subprocess.run(install, env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run().returncode == 0
    config = tmp_path / "etc" / "config.env"
    content = config.read_text()
    if loosen == "chmod 0666":
        config.chmod(0o666)
    else:
        os.chown(config, NOBODY, NOBODY)

    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert f"config file {config}: written" in proc.stdout
    info = config.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, 0, 0o644)
    assert config.read_text() == content
    assert ": unchanged" in run().stdout  # and then left alone


def test_entrypoint_configures_driver_and_agent_from_one_configmap(bao, generator, tmp_path, log_dir, plugin_dir):
    """The DaemonSet's container as it runs: entrypoint.sh installs (bundle + config file), then the agent
    starts with only its container-specific env and reports the ConfigMap's settings."""
    root = tmp_path / "node"
    root.mkdir()
    env, shared = split_env(driver_env(bao, generator, root, log_dir))
    configmap = tmp_path / "configmap"
    configmap_volume(configmap, {**shared, "VAULTTMPFS_PLUGIN_DIR": plugin_dir, "VAULTTMPFS_ROLE_NAME": "applications"})
    port = free_port()
    container_env = {**{k: v for k, v in env.items() if k not in ("PYTHONPATH",)},
                     "VAULTTMPFS_BUNDLE": str(REPO / "dist" / "vaulttmpfs"), "VAULTTMPFS_CONFIG_FROM": str(configmap),
                     "VAULTTMPFS_HEALTH_ADDR": f"127.0.0.1:{port}",
                     # As in the DaemonSet's container: without it the install went to the machine's real plugin dir.
                     "VAULTTMPFS_PLUGIN_DIR": plugin_dir}
    proc = subprocess.Popen([str(REPO / "installer" / "entrypoint.sh"), "--retry-interval", "1h"], env=container_env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=dies_with_parent())
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "the agent did not come up"
                time.sleep(0.3)
        settings = body["settings"]
        assert settings["vault_addr"] == shared["VAULT_ADDR"]
        assert settings["state_dir"] == shared["VAULTTMPFS_STATE_DIR"]
        assert settings["generator_token_path"] == shared["VAULTTMPFS_GENERATOR_TOKEN_PATH"]
        assert body["services"]["generator"]["valid"] is True  # it renewed the token the file names
        node = Kubelet([str(Path(plugin_dir) / "cloudwatt~vaulttmpfs" / "vaulttmpfs")], env, root)
        reply, path = node.mount(node.new_pod(), NGINX)  # the driver: same file, nothing in the kubelet's env
        assert reply.ok, reply.body
        assert node.unmount(path).ok
    finally:
        proc.terminate()
        proc.wait(30)


def _dies_with_parent_as_nobody():
    armed = dies_with_parent()
    return lambda: (armed(), become())


@other_user
def test_doctor_takes_no_settings_from_a_kubelet_a_node_user_runs(tmp_path):
    """Any node user can run a program called `kubelet`: doctor (root) would send the generator token to
    its VAULT_ADDR and run the driver in its VAULTTMPFS_PLUGIN_DIR."""
    shared = shared_dir()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        shutil.copy("/bin/sleep", shared / "kubelet")
        (shared / "plugins").mkdir(mode=0o777)
        shared.chmod(0o755)
        env = {"VAULT_ADDR": f"http://127.0.0.1:{listener.getsockname()[1]}",
               "VAULTTMPFS_PLUGIN_DIR": str(shared / "plugins")}
        fake = subprocess.Popen([str(shared / "kubelet"), "60"], env=env, preexec_fn=_dies_with_parent_as_nobody())
        ours = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "VAULT_ADDR": closed_addr(),
                "VAULTTMPFS_CONFIG_FILE": str(tmp_path / "none"), "VAULTTMPFS_STATE_DIR": str(tmp_path / "state"),
                "VAULTTMPFS_LOG_FILE": str(tmp_path / "log")}
        try:
            found = subprocess.run([*source_cmd(), "doctor", "--json", "--health-addr", ""], env=ours,
                                   capture_output=True, text=True, timeout=120)
            refused = subprocess.run([*source_cmd(), "doctor", "--kubelet-pid", str(fake.pid)], env=ours,
                                     capture_output=True, text=True, timeout=120)
        finally:
            fake.kill()
            fake.wait()
        report = json.loads(found.stdout)
        config = next(c for c in report["checks"] if c["name"] == "config")
        assert "this command's environment (no kubelet process found)" in config["detail"], report
        assert refused.returncode == 1 and not refused.stdout, refused
        assert f"pid {fake.pid} does not run as root (uids 65534 65534 65534 65534)" in refused.stderr, refused.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing of doctor's reached the node user's address
    finally:
        listener.close()
        shutil.rmtree(shared)


def test_doctor_does_not_run_a_driver_someone_else_could_have_written(doctor_node, tmp_path):
    driver_dir = tmp_path / "plugins" / "cloudwatt~vaulttmpfs"
    driver_dir.mkdir(parents=True)
    ran = tmp_path / "ran"
    (driver_dir / "vaulttmpfs").write_text(f"#!/bin/sh\ntouch {ran}\necho '{{\"status\": \"Success\"}}'\n")
    (driver_dir / "vaulttmpfs").chmod(0o755)
    os.chown(driver_dir / "vaulttmpfs", 65534, 65534)
    _, report, _ = doctor_node.doctor(VAULTTMPFS_PLUGIN_DIR=str(tmp_path / "plugins"))
    assert "is not root's alone (owner uid 65534, mode 0755): not run" in failed(report, "driver")["detail"]
    assert not ran.exists()


@pytest.mark.parametrize("command", ["status", "reconcile", "retry-revocations", "doctor"])
def test_a_state_dir_that_cannot_be_read_is_an_error_not_a_traceback(command, tmp_path):
    """What an operator without sudo, an I/O error or a damaged state dir meets: a plain error, exit 1;
    doctor reports it as a failed check and carries on."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for name in ("volumes", "pending", "intents"):
        (state / name).write_text("")  # listing it fails (ENOTDIR), as a root-only dir does for a user (EACCES)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "VAULTTMPFS_CONFIG_FILE": str(tmp_path / "none"),
           "VAULT_ADDR": closed_addr(), "VAULTTMPFS_STATE_DIR": str(state),
           "VAULTTMPFS_LOG_FILE": str(tmp_path / "log")}
    args = ["doctor", "--json", "--health-addr", ""] if command == "doctor" else [command]
    proc = subprocess.run([*source_cmd(), *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    if command == "doctor":
        failures = [c for c in json.loads(proc.stdout)["checks"] if c["status"] == "FAIL"]
        assert any(f"in the state dir {state} (VAULTTMPFS_STATE_DIR): Not a directory" in c["detail"]
                   for c in failures), failures
    else:
        assert f"in the state dir {state} (VAULTTMPFS_STATE_DIR): Not a directory" in proc.stderr, proc.stderr


def test_doctor_reads_the_kubelets_environment_and_reports_its_drift(doctor_node, tmp_path):
    """The driver gets the kubelet's environment: a drop-in there that disagrees with the ConfigMap is drift."""
    kubelet_env = {"PATH": os.environ["PATH"], "VAULTTMPFS_CONFIG_FILE": str(doctor_node.config),
                   "VAULT_ADDR": "https://vault.old.example:8200"}  # a stale drop-in
    # Stands in for the kubelet process.
    kubelet = subprocess.Popen(["sleep", "60"], env=kubelet_env, preexec_fn=dies_with_parent())
    try:
        code, report, text = doctor_node.doctor("--kubelet-pid", str(kubelet.pid))
    finally:
        kubelet.kill()
        kubelet.wait()
    assert code == 1
    config = next(c for c in report["checks"] if c["name"] == "config")
    assert f"the kubelet's environment (pid {kubelet.pid})" in config["detail"]
    assert "overridden by the environment: VAULT_ADDR" in config["detail"]
    check = failed(report, "settings")
    assert "vault_addr: driver 'https://vault.old.example:8200'" in check["detail"]
    assert "remove them from the kubelet's environment" in check["fix"]
