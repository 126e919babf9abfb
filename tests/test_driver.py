"""The driver end to end, called the way the kubelet calls it, against real OpenBao and real tmpfs.

Every test runs twice: against the source tree and against the PyInstaller build.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import driver_env, remember_secret, source_cmd, token_file
from .faultserver import CREATE
from .kubelet import Kubelet, is_mount_point, mount_entry
from .otheruser import NOBODY
from .vaultserver import VaultHTTPError, free_port
from .volumes import read_volume

NGINX = {"vault/policies": "nginx"}


def state_files(kubelet) -> list[Path]:
    volumes = kubelet.root / "state" / "volumes"
    return sorted(volumes.glob("*.json")) if volumes.exists() else []


def test_init_answers_capabilities_quickly(kubelet):
    reply = kubelet.init()
    assert reply.body == {"status": "Success", "capabilities": {"attach": False, "fsGroup": False}}
    assert reply.exit_code == 0


@pytest.mark.parametrize("verb", ["attach", "detach", "waitforattach", "isattached", "mountdevice",
                                  "unmountdevice", "getvolumename", "expandvolume", "frobnicate"])
def test_other_verbs_are_not_supported(kubelet, verb):
    reply = kubelet.call(verb, "{}")
    assert reply.status == "Not supported"
    assert reply.exit_code == 0


def test_mount_writes_a_wrapped_token_for_the_pod(kubelet, bao):
    pod = kubelet.new_pod("nginx-1", namespace="shop", service_account="web")
    reply, path = kubelet.mount(pod, NGINX, fs_group=2000)
    assert reply.ok and reply.exit_code == 0, reply.body

    entry = mount_entry(path)
    assert entry["fstype"] == "tmpfs" and entry["source"] == "vaulttmpfs"
    assert {"nosuid", "nodev", "noexec"} <= set(entry["options"])
    assert "size=1024k" in entry["super_options"] and "mode=750" in entry["super_options"]
    assert sorted(os.listdir(path)) == ["vault-token", "vault-token.json"]
    for name in ("vault-token", "vault-token.json"):
        info = (path / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o440 and info.st_uid == 0 and info.st_gid == 2000

    token, wrap_info = read_volume(path)
    assert wrap_info["token"] == token
    assert set(wrap_info) >= {"token", "accessor", "ttl", "creation_time", "creation_path", "wrapped_accessor"}
    assert wrap_info["creation_path"] == "auth/token/create/applications"
    assert wrap_info["ttl"] == 300  # VAULT_WRAP_TTL default 5m, really applied

    auth = bao.unwrap(token)["auth"]
    remember_secret(auth["client_token"])
    assert sorted(auth["policies"]) == ["default", "nginx"]
    assert auth["accessor"] == wrap_info["wrapped_accessor"]
    meta = auth["metadata"]
    assert meta["namespace"] == "shop" and meta["pod"] == "nginx-1" and meta["pod_uid"] == pod.uid
    assert meta["service_account"] == "web" and meta["node"] == os.uname().nodename

    assert kubelet.teardown(path).ok
    assert bao.lookup_accessor(auth["accessor"]) is None


def test_without_fsgroup_files_are_root_only(kubelet):
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert "mode=700" in mount_entry(path)["super_options"]
    for name in ("vault-token", "vault-token.json"):
        info = (path / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o400 and info.st_gid == 0
    assert kubelet.teardown(path).ok


def test_wrap_ttl_setting_is_applied(kubelet):
    kubelet.env["VAULT_WRAP_TTL"] = "90s"
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert read_volume(path)[1]["ttl"] == 90
    assert kubelet.teardown(path).ok


def test_volume_may_name_its_role(kubelet, bao):
    bao.write_role("batch", allowed_policies=["other"], orphan=True, token_period="1h")
    bao.write_policy("token_generator", (Path(__file__).parent.parent / "policies" /
                                         "token_generator_policy.hcl").read_text()
                     + '\npath "auth/token/create/batch" { capabilities = ["update"] }\n')
    reply, path = kubelet.mount(kubelet.new_pod(), {"vault/policies": "other", "vault/role": "batch"})
    assert reply.ok, reply.body
    token, wrap_info = read_volume(path)
    assert wrap_info["creation_path"] == "auth/token/create/batch"
    assert kubelet.teardown(path).ok


def test_old_three_argument_mount_form(kubelet):
    pod = kubelet.new_pod()
    path = kubelet.volume_dir(pod)
    reply = kubelet.call("mount", str(path), "/dev/unused", json.dumps(kubelet.options(pod, "token", NGINX)))
    assert reply.ok, reply.body
    assert is_mount_point(path)
    assert kubelet.teardown(path).ok


def test_read_only_volume_is_mounted_read_only(kubelet):
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX, read_only=True)
    assert reply.ok, reply.body
    assert "ro" in mount_entry(path)["options"]
    assert (path / "vault-token").read_text()
    assert kubelet.teardown(path).ok


def test_ca_cert_is_copied_into_the_volume(kubelet, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot used over plain http\n-----END CERTIFICATE-----\n")
    kubelet.env["VAULT_CACERT"] = str(ca)
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert (path / "ca.crt").read_text() == ca.read_text()
    assert kubelet.teardown(path).ok


def test_remount_is_idempotent_and_mints_nothing(kubelet, bao):
    pod = kubelet.new_pod()
    first, path = kubelet.mount(pod, NGINX)
    assert first.ok
    token, _ = read_volume(path)
    before = len(bao.accessors())
    again, _ = kubelet.mount(pod, NGINX)  # e.g. after a kubelet restart reconstructs the volume
    assert again.ok and again.exit_code == 0, again.body
    assert len(bao.accessors()) == before
    assert read_volume(path)[0] == token
    assert kubelet.teardown(path).ok


def test_unmount_revokes_pod_and_wrapping_tokens(kubelet, bao):
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok
    token, wrap_info = read_volume(path)
    assert bao.lookup_accessor(wrap_info["wrapped_accessor"]) is not None
    reply = kubelet.unmount(path)
    assert reply.ok and reply.exit_code == 0, reply.body
    assert "revoked" in reply.message
    assert not is_mount_point(path) and path.is_dir()  # the kubelet rmdirs, not us
    assert bao.lookup_accessor(wrap_info["wrapped_accessor"]) is None
    assert bao.lookup_accessor(wrap_info["accessor"]) is None
    assert state_files(kubelet) == []


def test_double_unmount_and_unmount_of_nothing_succeed(kubelet):
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok
    assert kubelet.unmount(path).ok
    second = kubelet.unmount(path)
    assert second.ok and second.exit_code == 0, second.body
    missing = kubelet.unmount(kubelet.root / "var/lib/kubelet/pods/nope/volumes/cloudwatt~vaulttmpfs/x")
    assert missing.ok, missing.body


def test_unmount_with_vault_down_still_unmounts_and_queues(kubelet, bao):
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok
    _, wrap_info = read_volume(path)
    kubelet.env["VAULT_ADDR"] = f"http://127.0.0.1:{free_port()}"
    reply = kubelet.unmount(path)
    assert reply.ok, reply.body
    assert "queued" in reply.message and wrap_info["wrapped_accessor"] in reply.message
    assert not is_mount_point(path)
    pending = kubelet.root / "state" / "pending"
    queued = {json.loads(p.read_text())["accessor"] for p in pending.glob("*.json")}
    assert wrap_info["wrapped_accessor"] in queued
    assert bao.lookup_accessor(wrap_info["wrapped_accessor"]) is not None  # still alive...

    kubelet.env["VAULT_ADDR"] = bao.addr  # ...until Vault is back and the retry runs
    retry = kubelet.call_cli("retry-revocations")
    assert retry.returncode == 0, retry.stdout
    assert bao.lookup_accessor(wrap_info["wrapped_accessor"]) is None
    assert list(pending.glob("*.json")) == []


@pytest.mark.parametrize("argv_options, expected", [
    ("{not json", "not valid JSON"),
    ('["vault/policies"]', "must be a JSON object"),
    ('{"vault/policies": 3}', "must be a string"),
    ("{}", "'vault/policies' is required"),
    ('{"vault/policies": " , "}', "is empty"),
    ('{"vault/policies": "nginx,../root"}', "invalid policy name"),
    ('{"vault/policies": "nginx", "vault/role": "../sys"}', "invalid role name"),
])
def test_bad_options_fail_cleanly(kubelet, bao, argv_options, expected):
    pod = kubelet.new_pod()
    path = kubelet.volume_dir(pod)
    before = len(bao.accessors())
    reply = kubelet.call("mount", str(path), argv_options)
    assert reply.status == "Failure" and reply.exit_code == 1
    assert expected in reply.message
    assert not is_mount_point(path)
    assert len(bao.accessors()) == before


def test_disallowed_policy_fails_without_mount_or_token(kubelet, bao):
    before = len(bao.accessors())
    reply, path = kubelet.mount(kubelet.new_pod(), {"vault/policies": "nginx,root"})
    assert reply.status == "Failure" and reply.exit_code == 1
    assert "400" in reply.message and "allowed policies" in reply.message
    assert not is_mount_point(path)
    assert len(bao.accessors()) == before
    assert state_files(kubelet) == []


def test_missing_generator_token_fails_with_the_fix(kubelet, tmp_path):
    kubelet.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] = str(tmp_path / "absent")
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.status == "Failure"
    assert str(tmp_path / "absent") in reply.message and "vaulttmpfs bootstrap" in reply.message
    assert not is_mount_point(path)


def test_vault_unreachable_fails_in_bounded_time(kubelet):
    kubelet.env["VAULT_ADDR"] = f"http://127.0.0.1:{free_port()}"
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.status == "Failure" and reply.exit_code == 1
    assert "cannot reach Vault" in reply.message
    assert reply.seconds < 10
    assert not is_mount_point(path)
    assert state_files(kubelet) == []


def test_concurrent_mounts_on_different_dirs(kubelet, bao):
    pods = [kubelet.new_pod(f"burst-{i}") for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        mounted = list(pool.map(lambda pod: kubelet.mount(pod, NGINX), pods))
    assert all(reply.ok for reply, _ in mounted), [r.body for r, _ in mounted if not r.ok]
    accessors = {read_volume(path)[1]["wrapped_accessor"] for _, path in mounted}
    assert len(accessors) == 20
    with ThreadPoolExecutor(20) as pool:
        unmounted = list(pool.map(lambda item: kubelet.teardown(item[1]), mounted))
    assert all(reply.ok for reply in unmounted)
    assert all(bao.lookup_accessor(a) is None for a in accessors)
    assert state_files(kubelet) == []


def test_output_is_json_even_when_the_state_dir_is_unusable(kubelet, tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    kubelet.env["VAULTTMPFS_STATE_DIR"] = str(blocker / "state")
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.status == "Failure" and reply.exit_code == 1
    assert not is_mount_point(path)



def test_vault_namespace_is_honoured(kubelet, bao, tmp_path):
    ns = {"X-Vault-Namespace": "team-a"}
    try:
        bao.request("POST", "sys/namespaces/team-a", {})
    except VaultHTTPError as exc:  # created by the other driver_cmd param's run
        assert "already exists" in exc.body
    policy = (Path(__file__).parent.parent / "policies" / "token_generator_policy.hcl").read_text()
    bao.request("PUT", "sys/policies/acl/token_generator", {"policy": policy}, headers=ns)
    bao.request("PUT", "sys/policies/acl/nginx", {"policy": 'path "x/*" { capabilities = ["read"] }'}, headers=ns)
    bao.request("POST", "auth/token/roles/applications", {"allowed_policies": ["nginx"], "orphan": True},
                headers=ns)
    generator = bao.request("POST", "auth/token/create", {"policies": ["token_generator"], "ttl": "10m"},
                            headers=ns)["auth"]
    kubelet.env.update(VAULT_NAMESPACE="team-a",
                       VAULTTMPFS_GENERATOR_TOKEN_PATH=token_file(tmp_path, generator["client_token"]))

    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    _, wrap_info = read_volume(path)
    assert "." in wrap_info["wrapped_accessor"]  # namespaced accessors carry the namespace id
    lookup = bao.request("POST", "auth/token/lookup-accessor", {"accessor": wrap_info["wrapped_accessor"]},
                         headers=ns)["data"]
    assert lookup["namespace_path"] == "team-a/" and "nginx" in lookup["policies"]
    assert kubelet.teardown(path).ok
    with pytest.raises(VaultHTTPError):
        bao.request("POST", "auth/token/lookup-accessor", {"accessor": wrap_info["wrapped_accessor"]}, headers=ns)
    bao.request("POST", "auth/token/revoke", {"token": generator["client_token"]}, headers=ns)


def test_mount_over_our_own_half_made_tmpfs_recovers(kubelet, bao):
    # What a driver killed between mount(2) and writing the files leaves behind.
    pod = kubelet.new_pod()
    path = kubelet.volume_dir(pod)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vaulttmpfs", str(path)], check=True)
    reply, _ = kubelet.mount(pod, NGINX)
    assert reply.ok, reply.body
    token, wrap_info = read_volume(path)
    assert bao.lookup_accessor(wrap_info["wrapped_accessor"]) is not None
    assert kubelet.teardown(path).ok
    assert not path.exists()


def test_unwritable_log_file_does_not_break_mounts(kubelet, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    kubelet.env["VAULTTMPFS_LOG_FILE"] = str(blocker / "vaulttmpfs.log")
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert kubelet.teardown(path).ok
    assert blocker.read_text() == ""


def test_a_full_log_filesystem_does_not_break_mounts_or_unmounts(kubelet, bao, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "logfull", str(logs)], check=True)
    try:
        log_file = logs / "vaulttmpfs.log"
        log_file.write_bytes(b"x" * 4096)  # the whole tmpfs: every further write gets ENOSPC
        kubelet.env["VAULTTMPFS_LOG_FILE"] = str(log_file)
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.ok, reply.body
        _token, wrap_info = read_volume(path)
        assert bao.lookup_accessor(wrap_info["wrapped_accessor"]) is not None
        reply = kubelet.unmount(path)
        assert reply.ok, reply.body
        assert not is_mount_point(path)
        assert bao.lookup_accessor(wrap_info["wrapped_accessor"]) is None
    finally:
        subprocess.run(["umount", str(logs)], check=False)


@pytest.mark.parametrize("content", [b"t\xc3\xb6ken\n", b"two words\n", b"\x00\x01\x02"])
def test_garbage_generator_token_file_is_named(kubelet, bao, tmp_path, content):
    garbage = tmp_path / "vaulttoken"
    garbage.write_bytes(content)
    garbage.chmod(0o600)
    kubelet.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] = str(garbage)
    before = len(bao.accessors())
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.status == "Failure" and reply.exit_code == 1
    assert str(garbage) in reply.message and "does not hold a Vault token" in reply.message
    assert not is_mount_point(path) and len(bao.accessors()) == before


# --- the metrics spool (telemetry): written after the answer, and the kubelet waits for the exit ----

SPOOL_TIMEOUT = 30  # a call that hangs on the spool fails the test here (it used to hang for good)


@pytest.mark.parametrize("planted", ["fifo", "symlinked dir"])
def test_nothing_is_spooled_into_a_state_dir_the_call_refused(kubelet, bao, tmp_path, planted):
    """A node user's state dir: the call refused it, then spooled there anyway, after the answer: a FIFO as
    calls.jsonl hung the call (mount pending, pod Terminating), a symlinked metrics/ had root create files
    at its target."""
    state, elsewhere = kubelet.root / "state", tmp_path / "elsewhere"
    (state / "metrics" if planted == "fifo" else state).mkdir(parents=True)
    elsewhere.mkdir()
    if planted == "fifo":
        os.mkfifo(state / "metrics" / "calls.jsonl", 0o666)
    else:
        (state / "metrics").symlink_to(elsewhere)
        os.lchown(state / "metrics", NOBODY, NOBODY)
        os.chown(elsewhere, NOBODY, NOBODY)
    os.chown(state, NOBODY, NOBODY)
    before = len(bao.accessors())
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX, timeout=SPOOL_TIMEOUT)
    assert reply.status == "Failure" and reply.exit_code == 1 and "is not trusted" in reply.message, reply.body
    assert not is_mount_point(path) and len(bao.accessors()) == before
    assert list(elsewhere.iterdir()) == []
    left = sorted(p.name for p in state.rglob("*"))
    assert left == (["calls.jsonl", "metrics"] if planted == "fifo" else ["metrics"])


def test_a_spool_that_is_not_a_regular_file_below_no_symlink_is_not_written(kubelet, tmp_path):
    """In root's own state dir too: metrics/ is never followed as a symlink, calls.jsonl never opened
    blocking nor written unless a regular file (a FIFO with a reader got the record)."""
    state, elsewhere = kubelet.root / "state", tmp_path / "elsewhere"
    state.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    (state / "metrics").symlink_to(elsewhere)
    path = kubelet.volume_dir(kubelet.new_pod())
    assert kubelet.unmount(path, timeout=SPOOL_TIMEOUT).ok
    assert list(elsewhere.iterdir()) == []
    (state / "metrics").unlink()
    (state / "metrics").mkdir(mode=0o700)
    os.mkfifo(state / "metrics" / "calls.jsonl", 0o600)
    reader = os.open(state / "metrics" / "calls.jsonl", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert kubelet.unmount(path, timeout=SPOOL_TIMEOUT).ok
        assert os.read(reader, 1 << 16) == b""
    finally:
        os.close(reader)


def test_a_held_spool_lock_costs_the_record_not_the_call(kubelet):
    spool = kubelet.root / "state" / "metrics" / "calls.jsonl"
    path = kubelet.volume_dir(kubelet.new_pod())
    assert kubelet.unmount(path).ok
    assert spool.read_bytes().count(b"\n") == 1
    holder = os.open(spool, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        reply = kubelet.unmount(path, timeout=SPOOL_TIMEOUT)
        assert reply.ok and reply.seconds < 10, reply
        assert spool.read_bytes().count(b"\n") == 1  # dropped, not waited for
    finally:
        os.close(holder)
    assert kubelet.unmount(path).ok
    assert spool.read_bytes().count(b"\n") == 2


# --- a stop signal (SIGTERM, SIGHUP) to a kubelet call ------------------------------------------------

def _calls_and_warnings(kubelet, path: Path) -> list[dict]:
    log = Path(kubelet.env["VAULTTMPFS_LOG_FILE"])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [line for line in lines if line.get("dir") == str(path)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_during_the_create_answers_one_failure_after_the_undo(faulty, fault, signum):
    """SIGTERM/SIGHUP used to kill the call: empty output (not JSON to the kubelet) and no undo."""
    faulty.env["VAULT_CLIENT_TIMEOUT"] = "60s"  # the hang below outlasts the test, not the client
    fault.add(CREATE, "hang", times=1)  # never reaches Vault: nothing is minted
    pod = faulty.new_pod()
    path = faulty.volume_dir(pod)
    proc = subprocess.Popen([*faulty.driver_cmd, "mount", str(path), json.dumps(faulty.options(pod, "token", NGINX))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=faulty.env)
    try:
        assert fault.arrived.wait(60)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    reply = json.loads(output)  # the kubelet's json.Unmarshal of stdout+stderr: exactly one object
    name = signal.Signals(signum).name
    assert reply == {"status": "Failure", "message": f"the call was stopped by {name} before it finished"}
    assert proc.returncode == 1
    # The undo ran: the volume's lock released and its file gone, the intent kept (the create was out)
    # and said so, and the call's outcome logged.
    state = faulty.root / "state"
    assert list((state / "volumes").glob("*.lock")) == [] and not is_mount_point(path)
    assert len(list((state / "intents").glob("*.json"))) == 1
    events = [line["event"] for line in _calls_and_warnings(faulty, path)]
    assert events[-1] == "driver call" and any("may have taken effect" in e for e in events), events


# Runs the driver's real entry (source) and sends it `signum` at `point`: "record" (just after the mint's
# record is written: the token's revocation is on the undo stack) or "answer" (just after the answer).
SIGNAL_AT = """
import os, sys
point, signum = sys.argv[1], int(sys.argv[2])
sys.argv = ["vaulttmpfs", *sys.argv[3:]]
from vaulttmpfs.engine import state
write_volume, write = state.StateStore.write_volume, os.write
def at_record(self, *args):
    written = write_volume(self, *args)
    if point == "record":
        os.kill(os.getpid(), signum)
    return written
def at_answer(fd, data):
    done = write(fd, data)
    if point == "answer" and bytes(data[:9]) == b'{"status"':
        os.kill(os.getpid(), signum)
    return done
state.StateStore.write_volume, os.write = at_record, at_answer
from vaulttmpfs.entry import main
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_after_the_mint_revokes_the_token_it_made(bao, generator, tmp_path, log_dir, signum):
    """The undo runs as for any failure after the create: the pod's tokens revoked, the record dropped
    (a kill used to leave them alive until the kubelet's unmount)."""
    root = tmp_path / "node"
    root.mkdir()
    node = Kubelet([sys.executable, "-c", SIGNAL_AT, "record", str(int(signum))],
                   driver_env(bao, generator, root, log_dir), root)
    before = set(bao.accessors())
    try:
        reply, path = node.mount(node.new_pod(), NGINX)
        assert reply.status == "Failure" and reply.exit_code == 1, reply.body
        assert f"stopped by {signal.Signals(signum).name}" in reply.message
        assert set(bao.accessors()) == before, "the token minted before the signal is alive"
        assert not is_mount_point(path)
        assert list((root / "state").glob("volumes/*")) == list((root / "state").glob("intents/*")) == []
    finally:
        for accessor in set(bao.accessors()) - before:
            bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})


def test_a_stop_signal_after_the_answer_changes_nothing(bao, generator, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    env = driver_env(bao, generator, root, log_dir)
    node = Kubelet([sys.executable, "-c", SIGNAL_AT, "answer", str(int(signal.SIGTERM))], env, root)
    reply, path = node.mount(node.new_pod(), NGINX)
    try:
        assert reply.ok and reply.exit_code == 0, reply.body  # nothing after the answer, and the usual exit
        assert reply.output.count(b"\n") == 1
        assert is_mount_point(path)  # a mount that answered Success is not undone
        read_volume(path)  # its token remembered for the leak check
        reply = node.unmount(path)
        assert reply.ok and reply.exit_code == 0 and not is_mount_point(path), reply.body
    finally:
        if is_mount_point(path):
            Kubelet(source_cmd(), env, root).unmount(path)
