"""Reconcile: a token whose pod is gone is revoked even when the kubelet never calls unmount.

Real OpenBao, real tmpfs, the driver exec'd the kubelet's way, the node agent as a real process
(source and build), and `vaulttmpfs reconcile` exec'd as cron would. The kubelet's orphan cleanup
is played as the kubelet does it: the volume unmounted behind the driver's back, then `rm -r` of
the pod dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vaulttmpfs.engine.state import StateStore

from .agents import AgentProcess, scrape, value
from .conftest import remember_secret, source_cmd
from .csinode import CsiNode
from .kubelet import is_mount_point
from .vaultserver import VaultHTTPError, closed_addr, free_port

NGINX = {"vault/policies": "nginx"}
PERIOD = "500ms"
RACE_VOLUMES = int(os.environ.get("VAULTTMPFS_RECONCILE_RACE_VOLUMES", "20"))
RACE_WORKERS = 4


def tokens(path: Path) -> dict[str, str]:
    """The pod token's and the wrapping token's accessors (the wrapping token itself is remembered)."""
    wrap = json.loads((path / "vault-token.json").read_text())
    remember_secret((path / "vault-token").read_text())
    return {"pod": wrap["wrapped_accessor"], "wrapping": wrap["accessor"], "wrapping_token": wrap["token"]}


def alive(bao, accessors: dict[str, str]) -> dict[str, bool]:
    return {kind: bao.lookup_accessor(accessors[kind]) is not None for kind in ("pod", "wrapping")}


def orphan_cleanup(kubelet, pod, path: Path) -> None:
    """What the kubelet's cleanupOrphanedPodDirs leaves: no mount, no pod dir, and no unmount call."""
    subprocess.run(["umount", str(path)], check=True)
    shutil.rmtree(kubelet.pods_dir / pod.uid)


def records(kubelet) -> dict[str, dict]:
    volumes = kubelet.root / "state" / "volumes"
    found = (json.loads(p.read_text()) for p in volumes.glob("*.json")) if volumes.exists() else ()
    return {r["mount_dir"]: r for r in found}


def reconcile_cli(kubelet, *args: str) -> tuple[int, dict | str]:
    proc = kubelet.call_cli("reconcile", *args)
    return proc.returncode, json.loads(proc.stdout) if "--json" in args else proc.stdout + proc.stderr


def by_dir(result: dict) -> dict[str, dict]:
    return {v["mount_dir"]: v for v in result["volumes"]}


def log_events(kubelet, event: str) -> list[dict]:
    lines = Path(kubelet.env["VAULTTMPFS_LOG_FILE"]).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == event]


def test_orphaned_pod_is_revoked_within_one_reconcile_period(kubelet, bao, driver_cmd):
    pod = kubelet.new_pod("orphan")
    reply, path = kubelet.mount(pod, NGINX)
    assert reply.ok, reply.body
    accessors = tokens(path)
    metrics_port = free_port()
    with AgentProcess(driver_cmd, kubelet.env, "--reconcile-interval", PERIOD,
                      "--metrics-addr", f"127.0.0.1:{metrics_port}") as agent:
        body = agent.wait_for(lambda s, b: b["services"]["reconcile"]["rounds"] >= 1, "a first reconcile round")
        assert body["services"]["reconcile"]["revoked"] == 0  # a mounted volume is a live pod's
        assert alive(bao, accessors) == {"pod": True, "wrapping": True}

        orphan_cleanup(kubelet, pod, path)
        rounds_before = agent.get()[1]["services"]["reconcile"]["rounds"]
        body = agent.wait_for(lambda s, b: b["services"]["reconcile"]["revoked"] >= 1, "the revocation")
        status = body["services"]["reconcile"]
        # The round running at removal may have missed it; the next one, within one period, did not.
        assert status["recent"][0]["round"] <= rounds_before + 2, status
        assert status["recent"][0]["mount_dir"] == str(path) and status["recent"][0]["pod_uid"] == pod.uid
        assert status["by_reason"] == {"pod_dir_removed": 1} and status["queued"] == 0
        samples = scrape(metrics_port)
        assert value(samples, "vaulttmpfs_reconcile_revocations_total", reason="pod_dir_removed") == 1
        assert value(samples, "vaulttmpfs_reconcile_revocations_total", reason="volume_dir_removed") == 0
        assert value(samples, "vaulttmpfs_reconcile_rounds_total") >= status["rounds"]
        assert agent.terminate() == 0
    assert alive(bao, accessors) == {"pod": False, "wrapping": False}
    assert records(kubelet) == {}
    assert not is_mount_point(path)
    logged = [e for e in log_events(kubelet, "revoking the token of a volume whose pod is gone")
              if e["dir"] == str(path)]  # the log file is shared by every test's node
    assert [(e["reason"], e["dir"], e["accessor"]) for e in logged] == [("pod_dir_removed", str(path),
                                                                          accessors["pod"])]
    assert "kubelet cleaned up the orphaned pod" in logged[0]["why"]


def test_mounted_and_rebooted_volumes_are_left_alone(kubelet, bao, driver_cmd):
    live_reply, live = kubelet.mount(kubelet.new_pod("live"), NGINX)
    rebooted_pod = kubelet.new_pod("rebooted")
    rebooted_reply, rebooted = kubelet.mount(rebooted_pod, NGINX)
    assert live_reply.ok and rebooted_reply.ok
    live_tokens, stale_tokens = tokens(live), tokens(rebooted)
    subprocess.run(["umount", str(rebooted)], check=True)  # the tmpfs vanished with a reboot; the dir stays
    with AgentProcess(driver_cmd, kubelet.env, "--reconcile-interval", PERIOD) as agent:
        body = agent.wait_for(lambda s, b: b["services"]["reconcile"]["rounds"] >= 3, "three reconcile rounds")
        assert body["services"]["reconcile"]["revoked"] == 0
        assert body["services"]["reconcile"]["volumes"] == 2
        assert agent.terminate() == 0
    assert alive(bao, live_tokens) == alive(bao, stale_tokens) == {"pod": True, "wrapping": True}
    assert set(records(kubelet)) == {str(live), str(rebooted)}
    assert is_mount_point(live) and not is_mount_point(rebooted)

    # The kubelet mounts the rebooted pod's volume again: the stale token is replaced, as today.
    reply, _ = kubelet.mount(rebooted_pod, NGINX)
    assert reply.ok, reply.body
    fresh_tokens = tokens(rebooted)
    assert fresh_tokens["pod"] != stale_tokens["pod"]
    assert alive(bao, stale_tokens) == {"pod": False, "wrapping": False}
    assert alive(bao, fresh_tokens) == {"pod": True, "wrapping": True}
    for path in (live, rebooted):
        assert kubelet.teardown(path).ok
    assert alive(bao, live_tokens) == alive(bao, fresh_tokens) == {"pod": False, "wrapping": False}


def test_dry_run_changes_nothing_and_a_real_run_revokes_once(kubelet, bao):
    live_reply, live = kubelet.mount(kubelet.new_pod("live"), NGINX)
    gone_pod = kubelet.new_pod("gone", namespace="shop")
    gone_reply, gone = kubelet.mount(gone_pod, NGINX)
    assert live_reply.ok and gone_reply.ok
    live_tokens, gone_tokens = tokens(live), tokens(gone)
    orphan_cleanup(kubelet, gone_pod, gone)
    state = kubelet.root / "state"
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}

    code, out = reconcile_cli(kubelet, "--dry-run")
    assert code == 0, out
    assert f"would revoke: {gone} (pod shop/gone, uid {gone_pod.uid}, accessor {gone_tokens['pod']})" in out
    assert "kubelet cleaned up the orphaned pod" in out and str(live) not in out
    assert "would revoke 1" in out and "dry run" in out
    code, result = reconcile_cli(kubelet, "--dry-run", "--json")
    assert code == 0 and result["dry_run"] is True and result["revoked"] == 0
    assert by_dir(result)[str(gone)]["action"] == "would revoke"
    assert by_dir(result)[str(gone)]["reason"] == "pod_dir_removed"
    assert (by_dir(result)[str(live)]["action"], by_dir(result)[str(live)]["reason"]) == ("kept", "mounted")
    # Nothing changed: Vault, the state dir (not even a lock file), the mount.
    assert alive(bao, gone_tokens) == alive(bao, live_tokens) == {"pod": True, "wrapping": True}
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == before
    assert is_mount_point(live)

    code, out = reconcile_cli(kubelet)
    assert code == 0, out
    assert f"revoked: {gone} (pod shop/gone" in out and "token revoked" in out and "revoked 1" in out
    assert alive(bao, gone_tokens) == {"pod": False, "wrapping": False}
    assert alive(bao, live_tokens) == {"pod": True, "wrapping": True}
    assert set(records(kubelet)) == {str(live)}
    code, result = reconcile_cli(kubelet, "--json")  # once: nothing left to do
    assert code == 0 and result["revoked"] == 0 and result["checked"] == 1
    assert kubelet.teardown(live).ok


def test_an_agent_that_cannot_see_the_pods_dir_revokes_nothing(kubelet, bao):
    """The shipped DaemonSet does not mount the kubelet's pods dir: every volume would look gone."""
    live_reply, live = kubelet.mount(kubelet.new_pod("live"), NGINX)
    gone_pod = kubelet.new_pod("gone")
    gone_reply, gone = kubelet.mount(gone_pod, NGINX)
    assert live_reply.ok and gone_reply.ok
    live_tokens, gone_tokens = tokens(live), tokens(gone)
    orphan_cleanup(kubelet, gone_pod, gone)
    # A private mount namespace in which the kubelet's root is an empty tmpfs: no pods dir there.
    hide = f'mount -t tmpfs blind "{kubelet.root / "var/lib"}" && exec "$@"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh",
                           *kubelet.driver_cmd, "reconcile", "--json"],
                          capture_output=True, text=True, env=kubelet.env, timeout=60)
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["revoked"] == 0 and result["checked"] == 2
    assert {v["reason"] for v in result["volumes"]} == {"pods_dir_not_visible"}
    assert "is not visible here" in result["errors"][0]
    assert alive(bao, live_tokens) == alive(bao, gone_tokens) == {"pod": True, "wrapping": True}
    assert set(records(kubelet)) == {str(live), str(gone)}

    code, result = reconcile_cli(kubelet, "--json")  # where the pods dir is visible
    assert code == 0 and result["revoked"] == 1
    assert alive(bao, gone_tokens) == {"pod": False, "wrapping": False}
    assert kubelet.teardown(live).ok


def test_revocations_vault_cannot_take_are_queued_like_unmounts(kubelet, bao):
    pod = kubelet.new_pod("gone")
    reply, path = kubelet.mount(pod, NGINX)
    assert reply.ok, reply.body
    accessors = tokens(path)
    orphan_cleanup(kubelet, pod, path)
    down = {**kubelet.env, "VAULT_ADDR": closed_addr()}
    proc = subprocess.run([*kubelet.driver_cmd, "reconcile"], env=down, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # cron sees that something is left to do
    assert f"queued: {path}" in proc.stdout and "queued for retry" in proc.stdout and "queued 1" in proc.stdout
    assert records(kubelet) == {}  # the record is done with; the queue holds what is left
    pending = kubelet.root / "state" / "pending"
    assert sorted(json.loads(p.read_text())["accessor"] for p in pending.glob("*.json")) == sorted(
        [accessors["pod"], accessors["wrapping"]])
    assert alive(bao, accessors) == {"pod": True, "wrapping": True}

    retried = kubelet.call_cli("retry-revocations")  # what the agent's retry loop does, once
    assert retried.returncode == 0 and "revoked 2" in retried.stdout, retried.stdout + retried.stderr
    assert alive(bao, accessors) == {"pod": False, "wrapping": False}


def lock_waiters(lock: Path) -> int:
    """Processes blocked in flock() on this file, from /proc/locks."""
    inode = lock.stat().st_ino
    count = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and int(fields[fields.index("->") + 5].split(":")[2]) == inode:
            count += 1
    return count


def test_reconcile_judges_again_under_the_volume_lock(kubelet, bao):
    """Reconcile saw the volume dir gone; by the time it holds the lock the kubelet has made the dir
    again and a mount is waiting for it: whichever gets the lock first, the new pod's token lives."""
    pod = kubelet.new_pod("retried")
    reply, path = kubelet.mount(pod, NGINX)
    assert reply.ok, reply.body
    stale = tokens(path)
    subprocess.run(["umount", str(path)], check=True)
    path.rmdir()  # the volume dir only: the pod dir stays, as after a failed mount
    store = StateStore(str(kubelet.root / "state"))
    with store.locked(str(path)):  # a verb on this volume is under way
        lock = next((kubelet.root / "state" / "volumes").glob("*.lock"))
        reconciling = subprocess.Popen([*kubelet.driver_cmd, "reconcile", "--json"], env=kubelet.env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: lock_waiters(lock) == 1, "reconcile to wait for the volume's lock")
        mounted = {}
        mounting = threading.Thread(target=lambda: mounted.update(reply=kubelet.mount(pod, NGINX)[0]))
        mounting.start()  # the kubelet's retry: the dir is made again, mount waits for the lock
        wait_until(lambda: lock_waiters(lock) == 2, "the mount to wait for the volume's lock")
    out, err = reconciling.communicate(timeout=60)
    mounting.join(timeout=60)
    assert reconciling.returncode == 0, err
    assert mounted["reply"].ok, mounted["reply"].body
    volume = by_dir(json.loads(out))[str(path)]
    assert volume["action"] == "kept" and volume["reason"] in {"dir_without_mount", "mounted"}, volume
    fresh = tokens(path)
    assert fresh["pod"] != stale["pod"]
    assert alive(bao, fresh) == {"pod": True, "wrapping": True}
    assert alive(bao, stale) == {"pod": False, "wrapping": False}  # the mount replaced it
    assert kubelet.teardown(path).ok


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_reconcile_every_100ms_never_revokes_a_live_pods_token(kubelet, bao, driver_cmd):
    """RACE_VOLUMES volumes mounted and unmounted concurrently while the agent reconciles every 100 ms:
    normal teardowns, orphaned pods, and volume dirs removed and mounted again (the kubelet's retry)."""
    orphans: list[dict] = []
    minted: list[dict] = []

    def pod_token_works(client_token: str) -> bool:
        try:
            bao.request("GET", "auth/token/lookup-self", token=client_token)
        except VaultHTTPError:
            return False
        return True

    def mount_and_check(pod, what: str) -> tuple[Path, dict, str]:
        reply, path = kubelet.mount(pod, NGINX)
        assert reply.ok, f"{what}: {reply.body}"
        accessors = tokens(path)
        minted.append(accessors)
        client_token = remember_secret(bao.unwrap(accessors["wrapping_token"])["auth"]["client_token"])
        assert pod_token_works(client_token), f"{what}: token dead right after mount"
        return path, accessors, client_token

    def life(i: int) -> None:
        pod = kubelet.new_pod(f"race-{i}")
        path, accessors, client_token = mount_and_check(pod, f"volume {i}")
        time.sleep(0.25)  # a few reconcile rounds while mounted
        assert pod_token_works(client_token), f"volume {i}: a live pod's token was revoked"
        if i % 3 == 1:  # the pod is orphaned: reconcile is the only one to revoke its token
            orphan_cleanup(kubelet, pod, path)
            orphans.append(accessors)
            return
        if i % 3 == 2:  # the volume dir is removed and made again, then mounted: races reconcile
            subprocess.run(["umount", str(path)], check=True)
            path.rmdir()
            path, accessors, client_token = mount_and_check(pod, f"volume {i} again")
            time.sleep(0.25)
            assert pod_token_works(client_token), f"volume {i}: the remounted pod's token was revoked"
        reply = kubelet.teardown(path)
        assert reply.ok and "revoked" in reply.message, reply.body

    with AgentProcess(driver_cmd, kubelet.env, "--reconcile-interval", "100ms") as agent:
        agent.wait_for(lambda s, b: b["services"]["reconcile"]["rounds"] >= 1, "a first reconcile round")
        with ThreadPoolExecutor(RACE_WORKERS) as pool:
            list(pool.map(life, range(RACE_VOLUMES)))  # re-raises a failed assertion
        body = agent.wait_for(lambda s, b: b["services"]["reconcile"]["revoked"] >= len(orphans) and
                              b["services"]["reconcile"]["volumes"] == 0, "the orphans' revocations")
        status = body["services"]["reconcile"]
        assert status["queued"] == 0 and status["last_error"] is None
        assert agent.terminate() == 0
    assert len(minted) == RACE_VOLUMES + len(range(2, RACE_VOLUMES, 3)) and orphans
    assert [a for a in minted if any(alive(bao, a).values())] == []  # nothing leaks
    assert records(kubelet) == {}
    assert [p for p in kubelet.pods_dir.glob("*/volumes/*/*") if is_mount_point(p)] == []


def test_an_orphaned_csi_volume_is_revoked_too(bao, generator, log_dir, tmp_path):
    """The same rule for the CSI front end (target <pods>/<uid>/volumes/kubernetes.io~csi/<name>/mount),
    with the agent serving CSI and reconciling in one process (source only: test_csi covers the build)."""
    from .csikubelet import new_pod as new_csi_pod

    node = CsiNode(source_cmd(), bao, generator, tmp_path, log_dir)
    try:
        node.agent = AgentProcess(node.cmd, node.env, "--reconcile-interval", PERIOD)
        node.agent.wait_for(lambda s, b: b["services"].get("csi", {}).get("serving"), "CSI serving")
        node.kubelet.wait_ready()
        live_pod, gone_pod = new_csi_pod("live"), new_csi_pod("gone")
        live, gone = node.kubelet.publish(live_pod, NGINX), node.kubelet.publish(gone_pod, NGINX)
        live_tokens, gone_tokens = tokens(live), tokens(gone)
        subprocess.run(["umount", str(gone)], check=True)  # the kubelet's orphan cleanup, no NodeUnpublish
        shutil.rmtree(node.kubelet.pods_dir / gone_pod.uid)
        body = node.agent.wait_for(lambda s, b: b["services"]["reconcile"]["revoked"] >= 1, "the revocation")
        assert body["services"]["reconcile"]["by_reason"] == {"pod_dir_removed": 1}
        assert alive(bao, gone_tokens) == {"pod": False, "wrapping": False}
        assert alive(bao, live_tokens) == {"pod": True, "wrapping": True}
        node.kubelet.teardown(live_pod)
        assert alive(bao, live_tokens) == {"pod": False, "wrapping": False}
    finally:
        node.stop()
