"""The pod's side: `vaulttmpfs token` exec'd (source and build) against volumes the driver mounted the
kubelet's way, real OpenBao, and the real OpenBao agent as a consumer; the `vault/unwrap` option; the
pod-side examples, validated offline and run for real where a real consumer exists here."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vaulttmpfs.pod.renewer import ROTATION_POLL

from .conftest import (
    driver_env,
    eventually,
    on_source_and_build,
    remember_secret,
    source_cmd,
    token_file,
    unmount_everything_under,
)
from .faultserver import FaultServer
from .kubelet import Kubelet
from .pki import issue, make_ca
from .podside import FS_GROUP, out_dir, pod_env, token_argv, wrapping_token
from .vaultserver import (
    REPO,
    VaultHTTPError,
    VaultServer,
    bao_binary,
    closed_addr,
    dies_with_parent,
    free_port,
    stop_process,
)

EXAMPLES = REPO / "installer" / "examples" / "pod-side"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
NGINX = {"vault/policies": "nginx"}
SHORT_ROLE, PERIOD = "pod-short", 3  # seconds: the renewal tests' token period
# The renewal tests run `token` from the source and the build side by side; the kubelet mounts with the source.
BOTH_SIDE_BY_SIDE = pytest.mark.parametrize("driver_cmd", [source_cmd()], ids=["source+build"])


@pytest.fixture(scope="module")
def kv_secret(bao) -> dict:
    """A KV v2 secret the nginx policy may read (the dev server mounts kv v2 at secret/)."""
    data = {"password": "pod-side-" + os.urandom(4).hex(), "user": "app"}
    bao.request("POST", "secret/data/nginx/app", {"data": data})
    return data


@pytest.fixture(scope="module")
def short_role(bao) -> str:
    """A token role with a 3 s period, which the session's generator token may create through."""
    bao.write_role(SHORT_ROLE, allowed_policies=["nginx"], orphan=True, token_period=f"{PERIOD}s")
    policy = bao.request("GET", "sys/policies/acl/token_generator")["data"]["policy"]
    grant = f'path "auth/token/create/{SHORT_ROLE}" {{ capabilities = ["update"] }}'
    if grant not in policy:
        bao.write_policy("token_generator", policy + "\n" + grant + "\n")
    return SHORT_ROLE


def run_token(driver_cmd, bao, volume, out, *flags, vault_addr: str | None = None) -> subprocess.CompletedProcess:
    # umask 0: the files' modes must not depend on the container's umask.
    return subprocess.run(token_argv(driver_cmd, volume, out, *flags), env=pod_env(vault_addr or bao.addr),
                          capture_output=True, text=True, timeout=60, umask=0)


def start_token(driver_cmd, bao, volume, out, *flags, vault_addr: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(token_argv(driver_cmd, volume, out, *flags), env=pod_env(vault_addr or bao.addr),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, umask=0,
                            preexec_fn=dies_with_parent())


def log_lines(stderr: str) -> list[dict]:
    """Every stderr line is one JSON log event."""
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    return eventually(predicate, what, timeout, step)


def rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00"))


def read_kv(bao, token: str) -> dict:
    return bao.request("GET", "secret/data/nginx/app", token=token)["data"]["data"]


def test_token_unwraps_once_writes_every_format_and_a_restart_reuses_it(kubelet, bao, kv_secret, driver_cmd,
                                                                      tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("app"), NGINX, fs_group=FS_GROUP)
    assert reply.ok, reply.body
    wrapped = wrapping_token(volume)
    meta = json.loads((volume / "vault-token.json").read_text())
    out = out_dir(tmp_path)

    first = run_token(driver_cmd, bao, volume, out)
    assert first.returncode == 0, first.stderr
    events = log_lines(first.stderr)
    assert [e["event"] for e in events] == ["unwrapped the volume's token", "token ready"]
    assert {e["level"] for e in events} == {"info"}

    token = remember_secret((out / "token").read_text())
    assert token != wrapped and "\n" not in token
    assert read_kv(bao, token) == kv_secret  # the token works
    record = json.loads((out / "kubernetes-vault.json").read_text())
    assert record == {"clientToken": token, "accessor": meta["wrapped_accessor"], "leaseDuration": 3600,
                      "renewable": True, "vaultAddr": bao.addr}
    for name in ("token", "kubernetes-vault.json"):
        info = (out / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o440 and info.st_gid == FS_GROUP, name  # despite umask 0
    assert sorted(os.listdir(out)) == ["kubernetes-vault.json", "token"]
    assert token not in first.stderr and wrapped not in first.stderr

    # The wrapping token is spent: any further unwrap fails...
    with pytest.raises(VaultHTTPError, match="not valid or does not exist"):
        bao.unwrap(wrapped)
    # ...yet a restarted container succeeds with the same token: it never tried to unwrap.
    again = run_token(driver_cmd, bao, volume, out)
    assert again.returncode == 0, again.stderr
    assert [(e["event"], e.get("reused")) for e in log_lines(again.stderr)] == [("token ready", True)]
    assert (out / "token").read_text() == token
    assert json.loads((out / "kubernetes-vault.json").read_text())["clientToken"] == token

    # A restart after a crash between files heals from the record; without an fsGroup dir, 0400.
    bare = out_dir(tmp_path, "bare", group=None)
    (bare / "kubernetes-vault.json").write_bytes((out / "kubernetes-vault.json").read_bytes())
    healed = run_token(driver_cmd, bao, volume, bare)
    assert healed.returncode == 0, healed.stderr
    assert (bare / "token").read_text() == token
    assert stat.S_IMODE((bare / "token").stat().st_mode) == 0o400

    assert kubelet.teardown(volume).ok
    assert bao.lookup_accessor(meta["wrapped_accessor"]) is None


@pytest.mark.parametrize("stderr", ["broken pipe", "closed"])
def test_a_log_the_container_cannot_take_does_not_stop_the_token(kubelet, bao, kv_secret, driver_cmd, tmp_path,
                                                                   stderr):
    # The container's log pipe gone (its reader dead) or never given: the token is still the pod's.
    reply, volume = kubelet.mount(kubelet.new_pod("app"), NGINX)
    assert reply.ok, reply.body
    out = out_dir(tmp_path, group=None)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run(token_argv(driver_cmd, volume, out), env=pod_env(bao.addr), stdout=subprocess.DEVNULL,
                             stderr=write_end if stderr == "broken pipe" else None, timeout=60, umask=0,
                             preexec_fn=(lambda: os.close(2)) if stderr == "closed" else None)
    finally:
        os.close(write_end)
    assert run.returncode == 0
    assert read_kv(bao, remember_secret((out / "token").read_text())) == kv_secret
    assert kubelet.teardown(volume).ok


@pytest.mark.parametrize("planted", ["kubernetes-vault.json", ".unwrap-unanswered"])
@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_fifo_or_symlink_planted_in_the_out_dir_is_not_read(kubelet, bao, kv_secret, driver_cmd, tmp_path,
                                                              planted, kind):
    # The out dir is the pod's shared emptyDir: another container may put anything under our names.
    reply, volume = kubelet.mount(kubelet.new_pod("planted"), NGINX)
    assert reply.ok, reply.body
    out = out_dir(tmp_path, group=None)
    if kind == "fifo":
        os.mkfifo(out / planted)  # opened for reading, it blocks until a writer comes: none does
    else:
        elsewhere = tmp_path / "elsewhere.json"
        forged = {"clientToken": "hvs.forged", "accessor": json.loads((volume / "vault-token.json").read_text())
                  .get("wrapped_accessor", ""), "at": 1.0}
        elsewhere.write_text(json.dumps(forged))
        os.symlink(elsewhere, out / planted)
    result = run_token(driver_cmd, bao, volume, out)
    assert result.returncode == 0, result.stderr
    token = remember_secret((out / "token").read_text())
    assert token != "hvs.forged" and read_kv(bao, token) == kv_secret
    if planted == ".unwrap-unanswered":
        assert not os.path.lexists(out / planted)  # dropped once the token is written
    else:
        assert stat.S_ISREG(os.lstat(out / planted).st_mode)  # replaced by the real record
        assert json.loads((out / planted).read_text())["clientToken"] == token
    if kind == "symlink":
        assert json.loads(elsewhere.read_text()) == forged  # never written through
    assert [e["event"] for e in log_lines(result.stderr)].count("unwrapped the volume's token") == 1
    assert kubelet.teardown(volume).ok


def test_a_record_naming_the_volumes_accessor_over_another_token_is_refused(kubelet, bao, driver_cmd, tmp_path):
    # Another container of the pod writes the shared out dir's record: this volume's accessor, a token of its own.
    reply, volume = kubelet.mount(kubelet.new_pod("forged-record"), NGINX)
    assert reply.ok, reply.body
    wrapped = wrapping_token(volume)
    accessor = json.loads((volume / "vault-token.json").read_text())["wrapped_accessor"]
    other = bao.create_token(policies=["other"], ttl="1h")
    remember_secret(other["client_token"])
    out = out_dir(tmp_path, group=None)
    (out / "kubernetes-vault.json").write_text(json.dumps({"clientToken": other["client_token"], "accessor": accessor}))
    try:
        result = run_token(driver_cmd, bao, volume, out)
        assert result.returncode == 1
        error = log_lines(result.stderr)[-1]["error"]
        assert "holds another one" in error and other["accessor"] in error and "tampering" in error, error
        assert not (out / "token").exists()  # the other token was not handed out
        assert unspent(bao, wrapped)  # the volume's wrapping token left as it was
    finally:
        bao.revoke_token(other["client_token"])
        assert kubelet.teardown(volume).ok


def test_temp_files_a_killed_writer_left_in_the_out_dir_are_removed(kubelet, bao, driver_cmd, tmp_path):
    # engine.files writes .<name>.<pid>.<thread>.tmp and renames it; a kill -9 in between leaves it (0600).
    reply, volume = kubelet.mount(kubelet.new_pod("killed-writer"), NGINX)
    assert reply.ok, reply.body
    out = out_dir(tmp_path, group=None)
    stale = [".token.4242.139871.tmp", ".kubernetes-vault.json.4242.139871.tmp", "..unwrap-unanswered.7.8.tmp"]
    others = [".token.tmp", ".other.4242.139871.tmp", "token.4242.1.tmp"]  # not names it writes
    for name in stale + others:
        (out / name).write_text("hvs.left-by-a-dead-writer")
        (out / name).chmod(0o600)
    (out / ".ca.crt.1.2.tmp").mkdir()  # not a file: left alone, and no reason to fail
    result = run_token(driver_cmd, bao, volume, out)
    assert result.returncode == 0, result.stderr
    remember_secret((out / "token").read_text())
    assert sorted(os.listdir(out)) == sorted(["kubernetes-vault.json", "token", ".ca.crt.1.2.tmp", *others])
    assert kubelet.teardown(volume).ok


def test_two_containers_starting_together_unwrap_once_and_share_the_token(kubelet, bao, driver_cmd, tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("twins"), NGINX)
    assert reply.ok, reply.body
    wrapping_token(volume)
    out = out_dir(tmp_path)
    procs = [start_token(driver_cmd, bao, volume, out) for _ in range(3)]
    try:
        codes = [proc.wait(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            stop_process(proc)
    events = [e for proc in procs for e in log_lines(proc.stderr.read())]
    assert codes == [0, 0, 0], events
    assert [e["event"] for e in events].count("unwrapped the volume's token") == 1
    assert sorted(e["reused"] for e in events if e["event"] == "token ready") == [False, True, True]
    remember_secret((out / "token").read_text())
    assert kubelet.teardown(volume).ok


def test_a_used_wrapping_token_names_possible_interception_and_writes_nothing(kubelet, bao, driver_cmd, tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("intercepted"), NGINX)
    assert reply.ok, reply.body
    stolen = bao.unwrap(wrapping_token(volume))["auth"]  # another reader got there first
    remember_secret(stolen["client_token"])
    out = out_dir(tmp_path)

    result = run_token(driver_cmd, bao, volume, out)
    assert result.returncode == 1
    error = log_lines(result.stderr)[-1]
    assert error["level"] == "error" and "already unwrapped by another reader" in error["error"]
    assert "POSSIBLE INTERCEPTION" in error["error"] and "delete the pod" in error["error"]
    assert os.listdir(out) == []
    assert kubelet.teardown(volume).ok
    assert bao.lookup_accessor(stolen["accessor"]) is None


def test_an_expired_wrapping_token_says_so_and_writes_nothing(kubelet, bao, driver_cmd, tmp_path):
    kubelet.env["VAULT_WRAP_TTL"] = "1s"
    reply, volume = kubelet.mount(kubelet.new_pod("late"), NGINX)
    assert reply.ok, reply.body
    wrapping_token(volume)
    time.sleep(1.5)
    out = out_dir(tmp_path)

    result = run_token(driver_cmd, bao, volume, out)
    assert result.returncode == 1
    error = log_lines(result.stderr)[-1]["error"]
    assert "expired at" in error and "VAULT_WRAP_TTL" in error and "INTERCEPTION" not in error
    assert os.listdir(out) == []
    assert kubelet.teardown(volume).ok


def test_a_token_whose_period_ran_out_before_the_pod_started_is_not_reported_ready(kubelet, bao, short_role,
                                                                                     driver_cmd, tmp_path):
    # The role's 3 s period is shorter than the wrap TTL (5m): the pod starts once the token has expired.
    reply, volume = kubelet.mount(kubelet.new_pod("late-period"), {**NGINX, "vault/role": short_role})
    assert reply.ok, reply.body
    wrapping_token(volume)
    time.sleep(PERIOD + 1)
    out = out_dir(tmp_path)
    first = run_token(driver_cmd, bao, volume, out)
    assert first.returncode == 1
    error = log_lines(first.stderr)[-1]["error"]
    assert "had already expired" in error and "period is shorter than the wrap TTL" in error, error
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # no token files
    # Its restart finds the wrapping token spent, and blames no interceptor.
    error = restart_error(driver_cmd, bao, volume, out)
    assert "sent the unwrap at" in error and "INTERCEPTION" not in error, error
    assert kubelet.teardown(volume).ok


def test_a_live_tokens_unwrap_is_the_only_vault_call(kubelet, bao, driver_cmd, tmp_path):
    # Whether the unwrapped token is alive is read off its lease and the volume's creation_time: no lookup.
    reply, volume = kubelet.mount(kubelet.new_pod("one-call"), NGINX)
    assert reply.ok, reply.body
    wrapping_token(volume)
    out = out_dir(tmp_path)
    with FaultServer(bao.addr) as gateway:
        assert run_token(driver_cmd, bao, volume, out, vault_addr=gateway.addr).returncode == 0
    remember_secret((out / "token").read_text())
    assert gateway.seen == [("POST", "/v1/sys/wrapping/unwrap")]
    assert kubelet.teardown(volume).ok


@BOTH_SIDE_BY_SIDE
def test_renew_keeps_a_short_period_token_alive_and_exits_within_a_period_of_revocation(
        kubelet, bao, short_role, tmp_path):
    on_source_and_build(lambda kind, driver_cmd: renewal_kept_then_ended(kubelet, bao, short_role, driver_cmd,
                                                                          tmp_path / kind))


def renewal_kept_then_ended(kubelet, bao, short_role, driver_cmd, tmp_path):
    tmp_path.mkdir()
    reply, volume = kubelet.mount(kubelet.new_pod("renewed"), {**NGINX, "vault/role": short_role})
    assert reply.ok, reply.body
    accessor = json.loads((volume / "vault-token.json").read_text())["wrapped_accessor"]
    out = out_dir(tmp_path)
    proc = start_token(driver_cmd, bao, volume, out, "--renew")
    try:
        wait_for(lambda: (out / "token").exists(), 30, "the token file")
        remember_secret((out / "token").read_text())
        expiries, started = [], time.monotonic()
        while time.monotonic() - started < 2.5 * PERIOD:  # a 3 s token would be long dead
            info = bao.lookup_accessor(accessor)
            assert info, f"the token died after {time.monotonic() - started:.1f}s"
            expiries.append(rfc3339(info["expire_time"]))  # finer than the whole seconds of "ttl"
            time.sleep(0.3)
        # Each renewal pushes the expiry (the TTL back up to the period): several within 2.5 periods.
        assert sum(later > earlier for earlier, later in pairwise(expiries)) >= 3, expiries
        assert proc.poll() is None

        bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
        revoked_at = time.monotonic()
        code = proc.wait(timeout=PERIOD + 5)
        assert time.monotonic() - revoked_at <= PERIOD
        assert code == 1
        error = log_lines(proc.stderr.read())[-1]
        assert error["event"] == "the pod's token can no longer be renewed" and error["accessor"] == accessor
    finally:
        stop_process(proc)
        assert kubelet.teardown(volume).ok


@BOTH_SIDE_BY_SIDE
def test_renew_backs_off_through_vault_errors_and_exits_once_the_token_has_expired(
        kubelet, bao, short_role, tmp_path):
    on_source_and_build(lambda kind, driver_cmd: renewal_backs_off_then_ends(kubelet, bao, short_role, driver_cmd,
                                                                             tmp_path / kind))


def renewal_backs_off_then_ends(kubelet, bao, short_role, driver_cmd, tmp_path):
    tmp_path.mkdir()
    reply, volume = kubelet.mount(kubelet.new_pod("flaky"), {**NGINX, "vault/role": short_role})
    assert reply.ok, reply.body
    accessor = json.loads((volume / "vault-token.json").read_text())["wrapped_accessor"]
    out = out_dir(tmp_path)
    renew = "/v1/auth/token/renew-self"
    with FaultServer(bao.addr) as gateway:
        proc = start_token(driver_cmd, bao, volume, out, "--renew", vault_addr=gateway.addr)
        try:
            wait_for(lambda: gateway.count(renew) >= 1, 30, "the first renewal")
            remember_secret((out / "token").read_text())
            # One renewal fails (all its attempts): retried sooner, the token lives on.
            gateway.add(renew, "error", times=3, status=503)
            time.sleep(2 * PERIOD)
            assert proc.poll() is None and bao.lookup_accessor(accessor)
            # Vault stays away: it gives up once the token has expired, within about one period.
            failing_since = time.monotonic()
            gateway.add(renew, "error", status=503)
            assert proc.wait(timeout=PERIOD + 10) == 1
            assert time.monotonic() - failing_since <= PERIOD + 1
        finally:
            stop_process(proc)
    events = log_lines(proc.stderr.read())
    retries = [e for e in events if e["event"] == "renewal failed; retrying"]
    assert retries and all(0 < e["retry_in"] <= PERIOD for e in retries)
    renewed_after_retry = [e["event"] for e in events[events.index(retries[0]):]]
    assert "renewed the pod's token" in renewed_after_retry
    assert events[-1]["event"] == "the pod's token expired before Vault could renew it"
    assert bao.lookup_accessor(accessor) is None  # expired in Vault too
    assert kubelet.teardown(volume).ok


def test_an_unwrap_that_got_no_answer_is_never_resent_and_the_restart_says_why(kubelet, bao, driver_cmd, tmp_path):
    """A gateway passes the unwrap to Vault, then drops the answer: the token is spent, not intercepted."""
    reply, volume = kubelet.mount(kubelet.new_pod("dropped"), NGINX)
    assert reply.ok, reply.body
    wrapping_token(volume)
    out = out_dir(tmp_path)

    def dropped(proc, gateway):
        gateway.release.set()
        assert proc.wait(timeout=30) == 1

    proc, unwraps = token_run_with_the_unwrap_answer_held(driver_cmd, bao, volume, out, dropped)
    assert unwraps == 1  # not resent
    first = log_lines(proc.stderr.read())[-1]["error"]
    assert "if Vault acted on it anyway" in first
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # no token files

    error = restart_error(driver_cmd, bao, volume, out)
    assert "got no answer" in error and "INTERCEPTION" not in error
    assert kubelet.teardown(volume).ok


def token_run_with_the_unwrap_answer_held(driver_cmd, bao, volume, out, while_held) -> tuple[subprocess.Popen, int]:
    """`token` through a gateway that passes the unwrap to Vault and holds its answer; while_held(proc,
    gateway) runs then, and the answer is released after it. The run, and how many unwraps reached Vault."""
    unwrap = "/v1/sys/wrapping/unwrap"
    with FaultServer(bao.addr) as gateway:
        gateway.add(unwrap, "hold-answer")
        proc = start_token(driver_cmd, bao, volume, out, vault_addr=gateway.addr)
        try:
            assert gateway.arrived.wait(30)
            while_held(proc, gateway)
        finally:
            gateway.release.set()
            stop_process(proc)
        return proc, gateway.count(unwrap)


def restart_error(driver_cmd, bao, volume, out) -> str:
    """The container restarted: it fails, and says why."""
    restart = run_token(driver_cmd, bao, volume, out)
    assert restart.returncode == 1
    return log_lines(restart.stderr)[-1]["error"]


def test_a_run_killed_while_vault_unwraps_leaves_its_restart_saying_so_not_interception(kubelet, bao, driver_cmd,
                                                                                      tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("killed"), NGINX)
    assert reply.ok, reply.body
    wrapping_token(volume)
    out = out_dir(tmp_path)

    def killed(proc, _gateway):  # the container killed (OOM, eviction) while Vault's answer is on its way
        proc.kill()
        proc.wait(timeout=30)

    token_run_with_the_unwrap_answer_held(driver_cmd, bao, volume, out, killed)
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # no token files
    error = restart_error(driver_cmd, bao, volume, out)
    assert "sent the unwrap at" in error and "not necessarily interception" in error and "INTERCEPTION" not in error
    assert kubelet.teardown(volume).ok


def test_an_unwrap_that_never_reached_vault_leaves_no_excuse_for_a_later_interception(kubelet, bao, driver_cmd,
                                                                                      tmp_path):
    """Vault refused the connection: the first run's unwrap never left, so the wrapping token found spent
    later was another reader's doing, not a lost answer."""
    reply, volume = kubelet.mount(kubelet.new_pod("unsent"), NGINX)
    assert reply.ok, reply.body
    out = out_dir(tmp_path)
    first = run_token(driver_cmd, bao, volume, out, vault_addr=closed_addr())
    assert first.returncode == 1
    error = log_lines(first.stderr)[-1]["error"]
    assert "never reached Vault" in error and "nothing was unwrapped" in error, error
    assert os.listdir(out) == []  # no note of an unwrap that may have been acted on

    stolen = bao.unwrap(wrapping_token(volume))["auth"]  # another reader, meanwhile
    remember_secret(stolen["client_token"])
    error = restart_error(driver_cmd, bao, volume, out)
    assert "POSSIBLE INTERCEPTION" in error and "sent the unwrap" not in error, error
    assert kubelet.teardown(volume).ok


@contextmanager
def one_page_out_dir(tmp_path: Path):
    """The pod's out dir on a 4 KiB tmpfs: room for one small file."""
    out = out_dir(tmp_path, group=None)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "vaulttmpfs-test-out", str(out)], check=True)
    try:
        yield out
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_an_out_dir_with_no_room_stops_the_run_before_the_unwrap(kubelet, bao, kv_secret, driver_cmd, tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("cramped"), NGINX)
    assert reply.ok, reply.body
    wrapping_token(volume)
    with one_page_out_dir(tmp_path) as out:
        (out / "filler").write_bytes(b"x" * 4096)  # the whole tmpfs
        first = run_token(driver_cmd, bao, volume, out)
        assert first.returncode == 1
        error = log_lines(first.stderr)[-1]["error"]
        assert "No space left on device" in error and "nothing was unwrapped" in error, error
        subprocess.run(["mount", "-o", "remount,size=64k", str(out)], check=True)  # room given
        again = run_token(driver_cmd, bao, volume, out)  # the wrapping token is still good
        assert again.returncode == 0, again.stderr
        assert read_kv(bao, remember_secret((out / "token").read_text())) == kv_secret
        assert not (out / ".unwrap-unanswered").exists()  # dropped once the token is out
    assert kubelet.teardown(volume).ok


def test_a_token_unwrapped_but_not_written_is_revoked_and_the_restart_says_why(kubelet, bao, driver_cmd, tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("half-room"), NGINX)
    assert reply.ok, reply.body
    wrapping_token(volume)
    meta = json.loads((volume / "vault-token.json").read_text())
    with one_page_out_dir(tmp_path) as out:  # the note before the unwrap fits; the token's record does not
        first = run_token(driver_cmd, bao, volume, out)
        assert first.returncode == 1
        error = log_lines(first.stderr)[-1]["error"]
        assert "unwrapped but could not be written" in error and "it was revoked" in error, error
        assert bao.lookup_accessor(meta["wrapped_accessor"]) is None  # nobody could have used it
        error = restart_error(driver_cmd, bao, volume, out)
        assert "sent the unwrap at" in error and "INTERCEPTION" not in error, error
    assert kubelet.teardown(volume).ok


def test_revoke_on_exit_revokes_the_token_on_sigterm(kubelet, bao, short_role, driver_cmd, tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("leaving"), {**NGINX, "vault/role": short_role})
    assert reply.ok, reply.body
    accessor = json.loads((volume / "vault-token.json").read_text())["wrapped_accessor"]
    out = out_dir(tmp_path)
    proc = start_token(driver_cmd, bao, volume, out, "--renew", "--revoke-on-exit")
    try:
        wait_for(lambda: (out / "token").exists(), 30, "the token file")
        remember_secret((out / "token").read_text())
        assert bao.lookup_accessor(accessor)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert log_lines(proc.stderr.read())[-1]["event"] == "stopping; revoked the pod's token"
        assert bao.lookup_accessor(accessor) is None
        # A restarted sidecar finds the revoked token and says so instead of serving it.
        again = run_token(driver_cmd, bao, volume, out)
        assert again.returncode == 1 and "no longer valid" in log_lines(again.stderr)[-1]["error"]
    finally:
        stop_process(proc)
        assert kubelet.teardown(volume).ok


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory):
    """OpenBao with a TLS listener too, its certificate from a throwaway CA the pod does not know."""
    pki = tmp_path_factory.mktemp("pod-pki")
    make_ca(pki, "ca")
    issue(pki, "server", "ca", "/CN=vault.test", san="IP:127.0.0.1")
    port = free_port()
    (pki / "listener.hcl").write_text(f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
                                      f'  tls_cert_file = "{pki}/server.pem"\n'
                                      f'  tls_key_file = "{pki}/server.key"\n}}\n')
    with VaultServer(extra_args=[f"-config={pki / 'listener.hcl'}"]) as server:
        server.setup_driver()
        auth = server.generator_token()
        yield {"server": server, "ca": pki / "ca.pem", "addr": f"https://127.0.0.1:{port}",
               "generator": {"path": token_file(pki, auth["client_token"])}}


def test_the_volumes_ca_verifies_vault_for_the_pod(tls_bao, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    server = tls_bao["server"]
    node = Kubelet(driver_cmd, driver_env(server, tls_bao["generator"], root, log_dir, VAULT_ADDR=tls_bao["addr"],
                                          VAULT_CACERT=str(tls_bao["ca"])), root)
    try:
        reply, volume = node.mount(node.new_pod("tls"), NGINX, fs_group=FS_GROUP)
        assert reply.ok, reply.body
        wrapping_token(volume)
        out = out_dir(tmp_path)
        # The pod knows only Vault's address: the volume's ca.crt is what makes TLS verify.
        result = run_token(driver_cmd, server, volume, out, vault_addr=tls_bao["addr"])
        assert result.returncode == 0, result.stderr
        token = remember_secret((out / "token").read_text())
        assert server.request("GET", "auth/token/lookup-self", token=token)["data"]["policies"] == ["default", "nginx"]
        assert (out / "ca.crt").read_bytes() == tls_bao["ca"].read_bytes()
        assert stat.S_IMODE((out / "ca.crt").stat().st_mode) == 0o444
        assert json.loads((out / "kubernetes-vault.json").read_text())["vaultAddr"] == tls_bao["addr"]
        assert node.teardown(volume).ok
        assert server.lookup_accessor(json.loads((out / "kubernetes-vault.json").read_text())["accessor"]) is None
    finally:
        unmount_everything_under(root)


def test_revoke_on_exit_needs_renew_and_vault_addr_is_required(driver_cmd, bao, tmp_path):
    result = run_token(driver_cmd, bao, tmp_path, tmp_path, "--revoke-on-exit")
    assert result.returncode == 2 and "--revoke-on-exit needs --renew" in result.stderr
    no_addr = subprocess.run(token_argv(driver_cmd, tmp_path, tmp_path), env={**pod_env(""), "VAULT_ADDR": ""},
                             capture_output=True, text=True, timeout=60)
    assert no_addr.returncode == 1 and "VAULT_ADDR is not set" in log_lines(no_addr.stderr)[-1]["error"]


def agent_example() -> tuple[dict, str]:
    docs = [doc for doc in yaml.safe_load_all((EXAMPLES / "vault-agent.yaml").read_text()) if doc]
    config_map = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    pod = next(doc for doc in docs if doc["kind"] == "Pod")
    agent = next(c for c in pod["spec"]["initContainers"] if c["name"] == "vault-agent")
    config_dir = next(m["mountPath"] for m in agent["volumeMounts"] if m["name"] == "agent-config")
    return config_map["data"], config_dir


def test_the_openbao_agent_renders_a_kv_secret_from_our_token_file(kubelet, bao, kv_secret, driver_cmd, tmp_path):
    """The vault-agent.yaml example's own agent config, its paths moved under tmp_path, run for real."""
    reply, volume = kubelet.mount(kubelet.new_pod("agent-fed"), NGINX, fs_group=FS_GROUP)
    assert reply.ok, reply.body
    out = out_dir(tmp_path)
    assert run_token(driver_cmd, bao, volume, out).returncode == 0
    remember_secret((out / "token").read_text())

    data, config_dir = agent_example()
    rendered_dir = tmp_path / "rendered"
    rendered_dir.mkdir()
    (tmp_path / "app.ctmpl").write_text(data["app.ctmpl"])
    moves = {"https://vault.vault.svc:8200": bao.addr, "/var/run/vault/token": str(out / "token"),
             f"{config_dir}/app.ctmpl": str(tmp_path / "app.ctmpl"),
             "/var/run/secrets/app/config.env": str(rendered_dir / "config.env")}
    config = data["agent.hcl"]
    for old, new in moves.items():
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "agent.hcl").write_text(config)

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    with open(tmp_path / "agent.log", "wb") as agent_log:
        agent = subprocess.Popen([bao_binary(), "agent", f"-config={tmp_path / 'agent.hcl'}"], env=env,
                                 stdout=agent_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 preexec_fn=dies_with_parent())
        try:
            rendered = wait_for(lambda: (rendered_dir / "config.env").exists()
                                and (rendered_dir / "config.env").read_text(), 30, "the agent's template")
        finally:
            stop_process(agent)
    lines = {line.strip() for line in rendered.splitlines() if line.strip()}
    assert lines == {f"{key}={value}" for key, value in kv_secret.items()}
    assert stat.S_IMODE((rendered_dir / "config.env").stat().st_mode) == 0o440
    assert kubelet.teardown(volume).ok


def test_unwrap_option_writes_a_plain_working_token_that_unmount_revokes(kubelet, bao, kv_secret, driver_cmd,
                                                                        tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("cannot-unwrap"), {**NGINX, "vault/unwrap": "true"},
                                  fs_group=FS_GROUP)
    assert reply.ok, reply.body
    token = remember_secret((volume / "vault-token").read_text())
    meta_text = (volume / "vault-token.json").read_text()
    assert token not in meta_text  # the metadata file never holds the token
    meta = json.loads(meta_text)
    assert meta["unwrapped"] is True and "wrapped_accessor" not in meta
    info = bao.request("GET", "auth/token/lookup-self", token=token)["data"]
    assert sorted(info["policies"]) == ["default", "nginx"] and info["accessor"] == meta["accessor"]
    assert info["meta"]["created_by"] == "vaulttmpfs"
    assert read_kv(bao, token) == kv_secret
    for name in ("vault-token", "vault-token.json"):
        assert stat.S_IMODE((volume / name).stat().st_mode) == 0o440

    # `vaulttmpfs token` hands the plain token on in the same formats.
    out = out_dir(tmp_path)
    result = run_token(driver_cmd, bao, volume, out)
    assert result.returncode == 0, result.stderr
    assert (out / "token").read_text() == token
    assert json.loads((out / "kubernetes-vault.json").read_text())["accessor"] == meta["accessor"]

    assert kubelet.teardown(volume).ok
    assert bao.lookup_accessor(meta["accessor"]) is None
    with pytest.raises(VaultHTTPError, match="403"):
        read_kv(bao, token)


def test_unwrap_option_takes_only_true_or_false(kubelet):
    reply, volume = kubelet.mount(kubelet.new_pod(), {**NGINX, "vault/unwrap": "maybe"})
    assert reply.status == "Failure" and "'vault/unwrap' must be" in reply.message
    assert not os.path.ismount(volume)


# --- a rotation met half-way: the node's two renames (the wrapping token, then its metadata) ---

def rotation_minted(bao) -> dict:
    """A new wrapped pod token as `vaulttmpfs rotate` mints one (through the role; root's token here): its
    wrap_info, which the node writes as the volume's metadata."""
    wrap = bao.request("POST", "auth/token/create/applications", {"policies": ["nginx"]},
                       headers={"X-Vault-Wrap-TTL": "120s"})["wrap_info"]
    remember_secret(wrap["token"])
    return wrap


def rotation_writes(volume: Path, wrap: dict, token: bool = True, metadata: bool = True) -> None:
    """The rotation's renames, in its order: the wrapping token first, then the metadata naming it."""
    for wanted, name, text in ((token, "vault-token", wrap["token"]), (metadata, "vault-token.json", json.dumps(wrap))):
        if wanted:
            temp = volume / f".{name}.test"
            temp.write_text(text)
            os.replace(temp, volume / name)


def unspent(bao, wrapping: str) -> bool:
    try:
        return bool(bao.request("POST", "sys/wrapping/lookup", {"token": wrapping})["data"])
    except VaultHTTPError:
        return False


def revoke_accessors(bao, *wraps: dict) -> None:
    """Tokens the test minted past the node's records (its teardown revokes only what they name)."""
    for accessor in (a for wrap in wraps for a in (wrap["wrapped_accessor"], wrap["accessor"])):
        try:  # the pod token, and its wrapping token (alive until its TTL if nobody unwrapped it)
            bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
        except VaultHTTPError:
            pass  # gone already


def test_a_run_between_a_rotations_two_renames_unwraps_nothing_and_its_restart_takes_the_new_token(
        kubelet, bao, kv_secret, driver_cmd, tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("torn"), NGINX)
    assert reply.ok, reply.body
    wrapping_token(volume)
    rotated = rotation_minted(bao)
    rotation_writes(volume, rotated, metadata=False)  # the first rename: a new wrapping token, the old metadata
    out = out_dir(tmp_path)
    try:
        started = time.monotonic()
        first = run_token(driver_cmd, bao, volume, out)
        assert first.returncode == 1
        error = log_lines(first.stderr)[-1]["error"]
        assert "name different wrapping tokens" in error and "nothing was unwrapped" in error, error
        assert time.monotonic() - started >= 0.9  # it looked again for about a second (the renames are ms apart)
        assert os.listdir(out) == []
        # The new wrapping token is neither spent nor its token revoked (which the unwrap's check would have done).
        assert unspent(bao, rotated["token"]) and bao.lookup_accessor(rotated["wrapped_accessor"])

        rotation_writes(volume, rotated, token=False)  # the second rename
        again = run_token(driver_cmd, bao, volume, out)
        assert again.returncode == 0, again.stderr
        assert json.loads((out / "kubernetes-vault.json").read_text())["accessor"] == rotated["wrapped_accessor"]
        assert read_kv(bao, remember_secret((out / "token").read_text())) == kv_secret
    finally:
        assert kubelet.teardown(volume).ok
        revoke_accessors(bao, rotated)


def test_a_sidecar_that_meets_a_rotation_half_written_waits_for_it_then_takes_it(kubelet, bao, kv_secret, driver_cmd,
                                                                               tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("twice-rotated"), NGINX)
    assert reply.ok, reply.body
    out = out_dir(tmp_path)
    first, second = rotation_minted(bao), rotation_minted(bao)
    proc = start_token(driver_cmd, bao, volume, out, "--renew")
    try:
        wait_for(lambda: (out / "token").exists(), 30, "the token file")
        remember_secret((out / "token").read_text())
        # Two rotations within one of its polls, its look landing in the second one's renames (SIGSTOP pins that).
        proc.send_signal(signal.SIGSTOP)
        rotation_writes(volume, first)
        rotation_writes(volume, second, metadata=False)
        proc.send_signal(signal.SIGCONT)
        time.sleep(2 * ROTATION_POLL + 0.5)  # looks at the torn pair
        assert proc.poll() is None
        assert unspent(bao, second["token"]) and bao.lookup_accessor(second["wrapped_accessor"])

        rotation_writes(volume, second, token=False)
        wait_for(lambda: json.loads((out / "kubernetes-vault.json").read_text())["accessor"]
                 == second["wrapped_accessor"], 10, "the sidecar taking the second rotation's token")
        assert read_kv(bao, remember_secret((out / "token").read_text())) == kv_secret
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        stop_process(proc)
        assert kubelet.teardown(volume).ok
        revoke_accessors(bao, first, second)
    events = log_lines(proc.stderr.read())
    assert {e["level"] for e in events} == {"info"}, events
    switched = [e["accessor"] for e in events if e["event"] == "switched to the rotated token"]
    assert switched == [second["wrapped_accessor"]]


def test_a_rotated_token_another_reader_took_is_unwrapped_once_and_the_revocation_that_follows_ends_the_sidecar(
        kubelet, bao, driver_cmd, tmp_path):
    reply, volume = kubelet.mount(kubelet.new_pod("rotation-stolen"), NGINX)
    assert reply.ok, reply.body
    accessor = json.loads((volume / "vault-token.json").read_text())["wrapped_accessor"]
    out = out_dir(tmp_path)
    unwrap, rotated = "/v1/sys/wrapping/unwrap", rotation_minted(bao)
    with FaultServer(bao.addr) as gateway:
        proc = start_token(driver_cmd, bao, volume, out, "--renew", vault_addr=gateway.addr)
        try:
            wait_for(lambda: (out / "token").exists(), 30, "the token file")
            remember_secret((out / "token").read_text())
            remember_secret(bao.unwrap(rotated["token"])["auth"]["client_token"])  # another reader, first
            rotation_writes(volume, rotated)
            wait_for(lambda: gateway.count(unwrap) == 2, 10, "the sidecar's unwrap of the rotated token")
            time.sleep(2 * ROTATION_POLL + 0.5)
            assert gateway.count(unwrap) == 2  # never resent
            assert proc.poll() is None  # its token still lives: it keeps it

            # The node revokes the old token once it sees the new wrapping token gone.
            bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
            revoked_at = time.monotonic()
            assert proc.wait(timeout=ROTATION_POLL + 10) == 1
            assert time.monotonic() - revoked_at <= ROTATION_POLL + 1  # at its next look, not its next renewal
        finally:
            stop_process(proc)
            assert kubelet.teardown(volume).ok
            revoke_accessors(bao, rotated)
    errors = [e for e in log_lines(proc.stderr.read()) if e["level"] == "error"]
    assert [e["event"] for e in errors] == [
        "cannot take the rotated token; keeping the current one until the node revokes it",
        "the pod's token was revoked after the rotated one could not be taken: the pod needs a new volume "
        "(delete the pod)"], errors
    assert "POSSIBLE INTERCEPTION" in errors[0]["error"]


# --- the examples: valid offline, and consistent with the command and each other ---

def example_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in EXAMPLE_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_pod_side_example_validates_against_the_kubernetes_schemas(path):
    # Native sidecars (an init container with restartPolicy: Always) need Kubernetes 1.29+.
    for doc in yaml.safe_load_all(path.read_text()):
        for version in ("1.29.0", kubernetes_validate.utils.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)


def test_pod_side_examples_use_the_command_as_it_is():
    from vaulttmpfs.cli import cli

    assert {p.name for p in EXAMPLE_FILES} == {"init-and-sidecar.yaml", "vault-agent.yaml", "vault-sidekick.yaml"}
    commands = 0
    for path, doc in example_docs():
        if doc["kind"] != "Pod":
            continue
        spec = doc["spec"]
        assert spec["securityContext"]["fsGroup"]  # the volume's files are readable by the pod's group only
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec.get("initContainers", []) + spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if container.get("command", [None])[-1] != "token":
                continue
            commands += 1
            args = container["args"]
            cli.commands["token"].make_context("token", list(args))  # flags the command knows
            volume, out = args[args.index("--volume") + 1], args[args.index("--out") + 1]
            assert volumes[mounts[volume]]["flexVolume"]["driver"] == "cloudwatt/vaulttmpfs", path.name
            assert volumes[mounts[out]]["emptyDir"]["medium"] == "Memory", path.name
            assert {"name": "VAULT_ADDR", "value": "https://vault.vault.svc:8200"} in container["env"]
        if path.name == "vault-sidekick.yaml":
            env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
            assert env["AUTH_FORMAT"] == "kubernetes-vault"
            assert env["AUTH_FILE"] == "/var/run/vault/kubernetes-vault.json"
        if path.name == "init-and-sidecar.yaml":
            sidecar = spec["initContainers"][1]
            assert sidecar["restartPolicy"] == "Always" and "--renew" in sidecar["args"]
    assert commands == 4
