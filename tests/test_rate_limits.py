"""An OpenBao rate-limit quota (sys/quotas/rate-limit) below the offered load: a real dev server, a real
quota on the create path, the driver exec'd as the kubelet does and the agent's CSI socket.

OpenBao answers a request over its quota with 429 before the request reaches its handler (checked here:
nothing is minted for it), so the driver resends a create after a 429, honouring Retry-After, within the
call's deadline; past it the call fails saying so (FlexVolume: a Failure the kubelet retries; CSI:
RESOURCE_EXHAUSTED) and the kubelet's retry mounts. Every pod mounts in the end, once, nothing leaks.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from .agents import scrape, value
from .conftest import driver_env, generator_file, remember_secret, unmount_everything_under
from .csinode import CsiNode
from .kubelet import Kubelet, is_mount_point
from .vaultserver import VaultServer, free_port

NGINX = {"vault/policies": "nginx"}
QUOTA = "sys/quotas/rate-limit/vaulttmpfs-test"


@pytest.fixture(scope="module")
def quota_bao():
    """A server of its own: its quota must not slow the rest of the suite."""
    with VaultServer() as server:
        server.setup_driver()
        server.request("POST", "sys/quotas/config", {"enable_rate_limit_response_headers": True})
        yield server


@pytest.fixture
def limited(quota_bao, tmp_path):
    """quota(rate, interval): creates at auth/token/create/* over `rate` per `interval` get a 429 (the path
    is a glob: OpenBao matches a bare "auth/token/create" only to itself, not to create/<role>)."""
    (tmp_path / "generator").mkdir()
    generator = {"path": str(tmp_path / "generator" / "token")}
    generator_file(quota_bao, Path(generator["path"]), ttl="1h")  # before the quota: it is a create too

    def quota(rate: float, interval: str) -> None:
        quota_bao.request("POST", QUOTA, {"rate": rate, "interval": interval, "path": "auth/token/create/*"})

    yield quota, generator
    quota_bao.request("DELETE", QUOTA)


def kubelet_for(cmd, bao, generator, tmp_path, log_dir, **env) -> Kubelet:
    root = tmp_path / "node"
    root.mkdir(exist_ok=True)
    return Kubelet(cmd, driver_env(bao, generator, root, log_dir, **env), root)


def volume_accessors(path: Path) -> set[str]:
    meta = json.loads((path / "vault-token.json").read_text())
    return {meta["wrapped_accessor"], meta["accessor"]}


def spooled(kubelet: Kubelet) -> list[dict]:
    spool = Path(kubelet.env["VAULTTMPFS_STATE_DIR"]) / "metrics" / "calls.jsonl"
    return [json.loads(line) for line in spool.read_text().splitlines()] if spool.exists() else []


def test_a_create_over_the_quota_waits_out_retry_after_and_mints_once(quota_bao, limited, driver_cmd, tmp_path,
                                                                      log_dir):
    quota, generator = limited
    kubelet = kubelet_for(driver_cmd, quota_bao, generator, tmp_path, log_dir)
    before = set(quota_bao.accessors())
    quota(1, "3s")
    try:
        first, first_path = kubelet.mount(kubelet.new_pod("first"), NGINX)
        assert first.ok, first.body
        second, second_path = kubelet.mount(kubelet.new_pod("second"), NGINX)
        # The 429 named Retry-After (~3 s): the driver waited it out inside the call, and got through.
        assert second.ok, second.body
        assert second.seconds > 1.0, second.seconds
        minted = set(quota_bao.accessors()) - before
        assert minted == volume_accessors(first_path) | volume_accessors(second_path)  # 2 pairs: none twice
        throttled = [r["throttled"] for r in spooled(kubelet) if r["verb"] == "mount"]
        assert throttled[-1] and set(throttled[-1]) == {"create"}, throttled  # counted for /metrics
        for path in (first_path, second_path):
            assert kubelet.teardown(path).ok
        assert set(quota_bao.accessors()) == before
    finally:
        unmount_everything_under(kubelet.root)


def test_past_the_deadline_a_mount_fails_naming_the_quota_and_the_kubelets_retry_mounts(
        quota_bao, limited, driver_cmd, tmp_path, log_dir):
    quota, generator = limited
    # A 1 s deadline (0.5 s x (0 + 2)) under a quota whose Retry-After is ~4 s: no time to wait it out.
    kubelet = kubelet_for(driver_cmd, quota_bao, generator, tmp_path, log_dir,
                          VAULT_CLIENT_TIMEOUT="500ms", VAULT_MAX_RETRIES="0")
    before = set(quota_bao.accessors())
    quota(1, "4s")
    try:
        used, used_path = kubelet.mount(kubelet.new_pod("uses-the-quota"), NGINX)
        assert used.ok, used.body
        pod = kubelet.new_pod("turned-away")
        reply, path = kubelet.mount(pod, NGINX)
        assert not reply.ok and reply.exit_code == 1
        assert "429" in reply.message and "rate-limit quota" in reply.message, reply.message
        assert reply.message.endswith("nothing was created; the kubelet retries the mount"), reply.message
        assert reply.seconds < 5, reply.seconds
        assert not is_mount_point(path)
        assert set(quota_bao.accessors()) - before == volume_accessors(used_path)  # nothing for the refusal
        assert [r["reason"] for r in spooled(kubelet) if r["outcome"] == "failure"] == ["rate_limited"]
        # The kubelet's retry (backoff 0.5 s doubling) mounts once the quota lets it.
        for backoff in (0.5, 1, 2, 4, 8):
            time.sleep(backoff)
            reply, path = kubelet.mount(pod, NGINX)
            if reply.ok:
                break
            assert "rate-limit quota" in reply.message, reply.message
        assert reply.ok, reply.body
        assert set(quota_bao.accessors()) - before == volume_accessors(used_path) | volume_accessors(path)
        for volume in (used_path, path):
            assert kubelet.teardown(volume).ok
        assert set(quota_bao.accessors()) == before
    finally:
        unmount_everything_under(kubelet.root)


def test_past_the_deadline_an_operator_s_call_says_try_again_later_not_that_the_kubelet_retries(
        quota_bao, limited):
    # What bootstrap and the operator commands call (in this process: no kubelet behind them).
    from vaulttmpfs.config import Config
    from vaulttmpfs.errors import VaultRateLimited
    from vaulttmpfs.vault.client import Vault

    quota, generator = limited
    config = Config.from_env({"VAULT_ADDR": quota_bao.addr, "VAULT_CLIENT_TIMEOUT": "500ms", "VAULT_MAX_RETRIES": "0",
                              "VAULTTMPFS_GENERATOR_TOKEN_PATH": generator["path"]})
    vault = Vault(config, Path(generator["path"]).read_text().strip())
    quota(1, "10s")
    made = vault.create_token("applications", ["nginx"], {}, "vaulttmpfs-quota-test")  # bootstrap's: no volume
    remember_secret(made["client_token"])
    try:
        with pytest.raises(VaultRateLimited) as refused:
            vault.create_token("applications", ["nginx"], {}, "vaulttmpfs-quota-test")
        assert str(refused.value).endswith("nothing was created; try again later"), refused.value
        assert "kubelet" not in str(refused.value)
    finally:
        quota_bao.request("POST", "auth/token/revoke-accessor", {"accessor": made["accessor"]})
    quota_bao.request("POST", QUOTA, {"rate": 1, "interval": "10s", "path": "auth/token/lookup-self"})
    vault.lookup_self()
    with pytest.raises(VaultRateLimited) as refused:
        vault.lookup_self()
    assert str(refused.value).endswith("Vault did not act on it; try again later"), refused.value
    assert "kubelet" not in str(refused.value) and "created" not in str(refused.value)


def test_a_csi_burst_over_the_quota_answers_resource_exhausted_then_every_pod_mounts(
        quota_bao, limited, tmp_path, log_dir):
    from .conftest import source_cmd

    quota, generator = limited
    port = free_port()
    node = CsiNode(source_cmd(), quota_bao, generator, tmp_path, log_dir, VAULT_CLIENT_TIMEOUT="500ms",
                   VAULT_MAX_RETRIES="0", VAULTTMPFS_METRICS_ADDR=f"127.0.0.1:{port}",
                   VAULTTMPFS_VAULT_WRITE_BUDGET="16").start()  # only the quota turns calls away here
    before = set(quota_bao.accessors())
    quota(4, "1s")
    pods = [Kubelet.new_pod(f"burst-{n}") for n in range(16)]
    codes: list[tuple[grpc.StatusCode, str]] = []

    def kubelet_publish(pod) -> Path:
        for backoff in (0.5, 1, 2, 4, 8, 8):
            try:
                return node.kubelet.publish(pod, NGINX)
            except grpc.RpcError as exc:
                codes.append((exc.code(), exc.details()))
                time.sleep(backoff)
        return node.kubelet.publish(pod, NGINX)

    try:
        with ThreadPoolExecutor(16) as pool:
            paths = list(pool.map(kubelet_publish, pods))
        assert codes, "the burst never met the quota: the test proves nothing"
        assert {code for code, _ in codes} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert all("rate-limit quota" in details for _, details in codes), codes
        minted = set(quota_bao.accessors()) - before
        assert minted == set().union(*(volume_accessors(p) for p in paths))  # 16 pairs, none twice
        samples = scrape(port)
        throttled = value(samples, "vaulttmpfs_vault_rate_limited_total", call="create")
        assert throttled >= len(codes)
        # Backing off between resends, never spinning: OpenBao's "Retry-After: 0" in a window's last second
        # once had each call resend hundreds of times until its deadline cut a create in flight (UNAVAILABLE).
        # A 1 s deadline leaves room for a few 429s per call at most (0.25 s, then 0.5 s, ...).
        assert throttled <= 4 * (len(codes) + len(pods)), throttled
        assert value(samples, "vaulttmpfs_volume_operations_total", verb="mount", front_end="csi", via="agent",
                     outcome="failure", reason="rate_limited") == len(codes)
        for pod in pods:
            node.kubelet.teardown(pod)
        assert set(quota_bao.accessors()) == before
    finally:
        node.stop()
