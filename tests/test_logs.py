"""Log level and a size-bounded log file, for the driver exec'd as the kubelet does and for the agent."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .conftest import driver_env
from .kubelet import Kubelet
from .test_agent import AgentProcess, generator_file
from .test_ops import write_config

NGINX = {"vault/policies": "nginx"}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_log_level_from_the_config_file(bao, generator, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    env = driver_env(bao, generator, root, log_dir, VAULTTMPFS_LOG_FILE=str(tmp_path / "driver.log"))
    node = Kubelet(driver_cmd, env, root)
    write_config(Path(env["VAULTTMPFS_CONFIG_FILE"]), {"VAULTTMPFS_LOG_LEVEL": "warning"})
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok and node.unmount(path).ok
    logged = lines(tmp_path / "driver.log")
    assert {e["level"] for e in logged} == {"warning"}, logged  # "no bindings" warnings; no info lines
    assert not any(e["event"] == "mounted" for e in logged)

    env["VAULTTMPFS_LOG_LEVEL"] = "debug"  # the environment overrides the file
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok and node.unmount(path).ok
    assert any(e["event"] == "mounted" for e in lines(tmp_path / "driver.log"))

    env["VAULTTMPFS_LOG_LEVEL"] = "chatty"
    reply, _ = node.mount(node.new_pod(), NGINX)
    assert not reply.ok and "VAULTTMPFS_LOG_LEVEL='chatty'" in reply.message


def test_log_file_is_rotated_by_size_without_torn_lines(bao, generator, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    log_file = tmp_path / "driver.log"
    env = driver_env(bao, generator, root, log_dir, VAULTTMPFS_LOG_FILE=str(log_file),
                     VAULTTMPFS_LOG_MAX_BYTES="2k")
    node = Kubelet(driver_cmd, env, root)
    for _ in range(4):
        reply, path = node.mount(node.new_pod(), NGINX)
        assert reply.ok and node.unmount(path).ok
    rotated = Path(f"{log_file}.1")
    assert rotated.exists() and log_file.exists()
    assert os.path.getsize(rotated) <= 2048 + 1024  # the limit plus the line that crossed it
    assert os.path.getsize(log_file) <= 2048 + 1024
    newest = lines(log_file)[-1]  # the newest line is in the current file: the last call's outcome line
    assert newest["event"] == "driver call" and newest["verb"] == "unmount"
    assert all("event" in e for e in lines(rotated))  # every line whole (json.loads would fail otherwise)
    assert (log_file.stat().st_mode & 0o777) == 0o600


def test_agent_reopens_its_log_on_sighup(bao, driver_cmd, tmp_path, log_dir):
    token_path = tmp_path / "vaulttoken"
    generator_file(bao, token_path, ttl="1h")
    log_file = tmp_path / "agent.log"
    env = driver_env(bao, {"path": str(token_path)}, tmp_path, log_dir, VAULTTMPFS_LOG_FILE=str(log_file),
                     VAULTTMPFS_RENEW_INTERVAL="1s", VAULTTMPFS_LOG_MAX_BYTES="0")
    with AgentProcess(driver_cmd, env) as agent:
        agent.wait_for(lambda s, b: s == 200, "a first renewal")
        moved = tmp_path / "agent.log.old"
        log_file.rename(moved)  # what logrotate does before its postrotate
        time.sleep(1.5)
        assert not log_file.exists()  # still writing to the moved file: nothing reopened yet
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not (log_file.exists() and any(e["event"] == "generator token renewed" for e in lines(log_file))):
            assert time.monotonic() < deadline, "the agent did not reopen its log after SIGHUP"
            time.sleep(0.2)
        assert agent.proc.poll() is None
        assert agent.terminate() == 0
    assert any(e["event"] == "generator token renewed" for e in lines(moved))
