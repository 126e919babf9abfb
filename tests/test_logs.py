"""Log level and a size-bounded log file, for the driver exec'd as the kubelet does and for the agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .agents import AgentProcess
from .conftest import driver_env, generator_file, write_config
from .kubelet import Kubelet
from .otheruser import NOBODY
from .vaultserver import REPO

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


@pytest.mark.parametrize("planted", ["symlink", "file", "fifo"])
def test_a_log_file_a_node_user_planted_is_not_written(bao, generator, driver_cmd, tmp_path, log_dir, planted):
    """The log's dir may be one others can write (/var/log is 0775 root:syslog on Ubuntu): root's calls never
    append through their symlink, to their file, or block on their FIFO; logging is off instead."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o777)
    victim = tmp_path / "root-only"
    victim.write_text("root's\n")
    log_file = logs / "vaulttmpfs.log"
    if planted == "symlink":
        log_file.symlink_to(victim)
    elif planted == "file":
        log_file.touch()
    else:
        os.mkfifo(log_file)
    os.lchown(log_file, NOBODY, NOBODY)
    root = tmp_path / "node"
    root.mkdir()
    node = Kubelet(driver_cmd, driver_env(bao, generator, root, log_dir, VAULTTMPFS_LOG_FILE=str(log_file)), root)
    reply, path = node.mount(node.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert node.unmount(path).ok
    assert victim.read_text() == "root's\n"
    if planted == "file":
        assert log_file.stat().st_size == 0


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
    assert os.path.getsize(rotated) <= 2048  # rotated before the line that would cross the limit
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


def test_masking_holds_with_thousands_of_registered_secrets(tmp_path):
    """The agent registers a token per call; past a few dozen secrets an index finds them in a line.
    Every registered secret is masked wherever it sits in a line, as is or escaped by repr() and JSON."""
    log_file = tmp_path / "many.log"
    script = f"""
import json, random, secrets, sys
from vaulttmpfs import log
from vaulttmpfs.config import Config
tokens = ["hvs.CAESI" + secrets.token_urlsafe(60) for _ in range(log.MAX_SECRETS - 100)]
for token in tokens:
    log.secret(token)
odd = 'ab"c\\\\\\\\d\\\\nefghijklmnop\\\\u00e9'  # quotes, a backslash, a newline, non-ASCII
log.secret(odd)
log.configure(Config(log_file={str(log_file)!r}))
logger = log.get()
rng = random.Random(7)
for _ in range(400):
    token = rng.choice(tokens)
    where = rng.choice(["error", "quoted", "nested"])  # one occurrence per line, at a random offset
    value = "y" * rng.randint(0, 30) + token + "z" * rng.randint(0, 9)
    field = {{"error": value, "quoted": repr(value + "\\n"), "nested": {{"k": [value]}}}}[where]
    logger.info("x" * rng.randint(0, 9), **{{where: field}})
logger.info("odd", value=odd, quoted=repr(odd), error=f"bad value: {{odd!r}}")
json.dump({{"registered": len(log._secrets), "tokens": tokens}}, sys.stdout)
"""
    result = subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    facts = json.loads(result.stdout)
    assert facts["registered"] > 100 * 10  # far past the few a kubelet call registers: the index searched
    written = log_file.read_text()
    assert len(written.splitlines()) == 401 and written.count("<redacted>") >= 400 + 3
    assert "CAESI" not in written and "efghijklmnop" not in written
