"""On-demand rotation (docs/rotation.md): `vaulttmpfs rotate` gives a mounted volume a freshly minted
wrapped token (files replaced atomically, a read-only tmpfs stays read-only); `vaulttmpfs token --renew`
in the pod notices it, unwraps it and switches its output files; the old token is revoked once the
pod side took the new one, or after the grace period; the real `bao agent` consumer keeps rendering
its secret across the rotation; and nothing is left alive once the pods are gone.

A real agent serving CSI, real OpenBao, real tmpfs, the kubelet's calls, the real `bao agent`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import eventually, remember_secret, source_cmd
from .csikubelet import new_pod
from .csinode import CsiNode
from .faultserver import CREATE, FaultServer
from .kubelet import mount_entry
from .vaultserver import REPO, bao_binary, dies_with_parent, stop_process
from .volumes import read_volume, write_bindings

NGINX = {"vault/policies": "nginx"}
FS_GROUP = 2000
SHORT_ROLE = "rotate-short"


@pytest.fixture(scope="module")
def short_role(bao) -> str:
    """Tokens with a 3 s period: a `bao agent` consumer renews them every ~2 s, so it meets the old
    token's revocation (and re-reads its token file) within seconds, not at 2/3 of an hour."""
    bao.write_role(SHORT_ROLE, allowed_policies=["nginx"], orphan=True, token_period="3s")
    policy = bao.request("GET", "sys/policies/acl/token_generator")["data"]["policy"]
    grant = f'path "auth/token/create/{SHORT_ROLE}" {{ capabilities = ["update"] }}'
    if grant not in policy:
        bao.write_policy("token_generator", policy + "\n" + grant + "\n")
    return SHORT_ROLE


@pytest.fixture(scope="module")
def node(bao, generator, log_dir, tmp_path_factory):
    node = CsiNode(source_cmd(), bao, generator, tmp_path_factory.mktemp("rotate-node"), log_dir).start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def short_wrap_node(bao, generator, log_dir, tmp_path_factory):
    """A node whose wrapping tokens expire 4 s after they are made (VAULT_WRAP_TTL)."""
    node = CsiNode(source_cmd(), bao, generator, tmp_path_factory.mktemp("rotate-wrap-node"), log_dir,
                   VAULT_WRAP_TTL="4s").start()
    yield node
    node.stop()


def cli(node: CsiNode, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*node.cmd, *args], capture_output=True, text=True, env=node.env, timeout=120)


def rotate(node: CsiNode, *args: str) -> list[dict]:
    out = cli(node, "rotate", "--json", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)["volumes"]


def pending(node: CsiNode) -> set[str]:
    return {json.loads(p.read_text())["accessor"] for p in (node.root / "state" / "pending").glob("*.json")}


def unrecorded(node: CsiNode, pod) -> list[dict]:
    """The token creates for this pod `vaulttmpfs status --json` counts as possibly alive, unrecorded."""
    out = cli(node, "status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return [c for c in json.loads(out.stdout)["unrecorded"]["creates"] if c["pod_uid"] == pod.uid]


def forget_unrecorded(node: CsiNode, pod) -> None:
    """What reconcile does once their bound has passed (the role's period: too long to wait here)."""
    for path in (node.root / "state" / "intents").glob("*.json"):
        if json.loads(path.read_text()).get("pod_uid") == pod.uid:
            path.unlink()



def pod_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 0, FS_GROUP)
    out.chmod(0o2770)
    return out


def start_token(volume: Path, out: Path, vault_addr: str) -> subprocess.Popen:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "VAULT_ADDR": vault_addr}
    return subprocess.Popen([*source_cmd(), "token", "--volume", str(volume), "--out", str(out), "--renew"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, umask=0,
                            preexec_fn=dies_with_parent())


AGENT_HCL = """
vault {{ address = "{addr}" }}
auto_auth {{
  method {{
    type = "token_file"
    config = {{ token_file_path = "{token}" }}
  }}
}}
template_config {{ static_secret_render_interval = "1s" }}
template {{
  contents    = "{{{{ with secret \\"secret/data/nginx/rotated\\" }}}}{{{{ .Data.data.password }}}}{{{{ end }}}}"
  destination = "{out}"
}}
"""


def test_rotation_switches_the_pod_and_its_bao_agent_to_a_new_token_and_revokes_the_old(node, bao, short_role,
                                                                                         tmp_path):
    kubelet = node.kubelet
    bao.request("POST", "secret/data/nginx/rotated", {"data": {"password": "before"}})
    pod = new_pod("rotated", namespace="shop")
    volume = kubelet.publish(pod, {**NGINX, "vault/role": short_role}, fs_group=FS_GROUP, read_only=True)
    old = read_volume(volume)[1]
    out = pod_out(tmp_path)
    token = start_token(volume, out, bao.addr)
    agent = None
    try:
        old_token = eventually(lambda: (out / "token").exists() and (out / "token").read_text(), "the pod's token")
        remember_secret(old_token)
        rendered = tmp_path / "rendered.txt"
        (tmp_path / "agent.hcl").write_text(AGENT_HCL.format(addr=bao.addr, token=out / "token", out=rendered))
        with open(tmp_path / "agent.log", "wb") as agent_log:  # the child keeps its own copy of the fd
            agent = subprocess.Popen([bao_binary(), "agent", f"-config={tmp_path / 'agent.hcl'}"],
                                     env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
                                     stdout=agent_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=dies_with_parent())
        eventually(lambda: rendered.exists() and rendered.read_text() == "before", "the agent's first render")

        [result] = rotate(node, "--pod-uid", pod.uid)
        assert result["outcome"] == "rotated", result
        new = read_volume(volume)[1]
        assert new["wrapped_accessor"] != old["wrapped_accessor"]
        assert "ro" in mount_entry(volume)["options"]  # still read-only for the pod
        assert (volume / "vault-token").stat().st_gid == FS_GROUP

        # The pod side takes the new token: its output files switch to it.
        new_token = eventually(lambda: (t := (out / "token").read_text()) != old_token and t, "the switch")
        remember_secret(new_token)
        assert bao.lookup_accessor(new["wrapped_accessor"]) is not None
        assert json.loads((out / "kubernetes-vault.json").read_text())["accessor"] == new["wrapped_accessor"]
        # It took the new one, so the agent's retry revokes the old one now (the grace period is 10m).
        assert cli(node, "retry-revocations").returncode == 0
        assert bao.lookup_accessor(old["wrapped_accessor"]) is None
        assert bao.lookup_accessor(new["wrapped_accessor"]) is not None and not pending(node)

        # The agent held the revoked token: its next renewal fails, it reads the token file again (the
        # new token) and renders the new value.
        bao.request("POST", "secret/data/nginx/rotated", {"data": {"password": "after"}})
        eventually(lambda: rendered.read_text() == "after", "the agent rendering with the new token", timeout=60)
        assert token.poll() is None  # still renewing, the new token
    finally:
        if agent is not None:
            stop_process(agent)
        token.terminate()
        stderr = token.communicate(timeout=30)[1]
    assert "switched to the rotated token" in stderr and new_token not in stderr and old_token not in stderr
    kubelet.teardown(pod)
    assert bao.lookup_accessor(new["wrapped_accessor"]) is None and bao.lookup_accessor(new["accessor"]) is None


def test_an_old_token_nobody_took_the_new_one_for_lives_out_its_grace_then_goes(node, bao):
    kubelet = node.kubelet
    pods = [new_pod("grace-a", namespace="default"), new_pod("grace-b", namespace="default"),
            new_pod("other", namespace="shop")]
    paths = [kubelet.publish(p, NGINX) for p in pods]
    olds = [read_volume(p)[1] for p in paths]
    results = rotate(node, "--namespace", "default", "--grace", "3s")
    assert sorted(r["pod"] for r in results) == ["grace-a", "grace-b"]
    assert all(r["outcome"] == "rotated" for r in results)
    assert [unrecorded(node, p) for p in pods] == [[], [], []]  # a rotation that went well notes none
    assert read_volume(paths[2])[1] == olds[2]  # another namespace: untouched
    news = [read_volume(p)[1] for p in paths[:2]]
    # Nobody unwrapped the new tokens: the old ones wait for the grace period.
    assert cli(node, "retry-revocations").returncode == 0
    assert all(bao.lookup_accessor(o["wrapped_accessor"]) is not None for o in olds[:2])
    assert {o["wrapped_accessor"] for o in olds[:2]} <= pending(node)
    time.sleep(3.5)
    assert cli(node, "retry-revocations").returncode == 0
    assert all(bao.lookup_accessor(o["wrapped_accessor"]) is None for o in olds[:2]) and not pending(node)
    for path, new in zip(paths[:2], news, strict=True):
        remember_secret((path / "vault-token").read_text())
        assert bao.lookup_accessor(new["wrapped_accessor"]) is not None
    for pod in pods:
        kubelet.teardown(pod)
    assert all(bao.lookup_accessor(n["wrapped_accessor"]) is None for n in news)
    assert bao.lookup_accessor(olds[2]["wrapped_accessor"]) is None


def test_a_new_wrapping_token_that_expired_is_not_the_pod_taking_it(short_wrap_node, bao):
    """`--grace` is how long the old token lives at the latest when the pod never takes the new one (no
    sidecar): the new wrapping token expiring (VAULT_WRAP_TTL, 4 s here) does not cut it short. One the
    pod unwraps before it could expire is taken: its old token goes at the next retry."""
    node, kubelet = short_wrap_node, short_wrap_node.kubelet
    idle, taking = new_pod("no-sidecar", namespace="default"), new_pod("unwraps", namespace="default")
    paths = [kubelet.publish(p, NGINX) for p in (idle, taking)]
    olds = [read_volume(p)[1] for p in paths]
    results = rotate(node, "--namespace", "default", "--grace", "1h")
    assert [r["outcome"] for r in results] == ["rotated", "rotated"], results
    news = [read_volume(p)[1] for p in paths]
    # The second pod takes its new token now, as its `vaulttmpfs token --renew` would.
    remember_secret(bao.unwrap((paths[1] / "vault-token").read_text())["auth"]["client_token"])
    assert cli(node, "retry-revocations").returncode == 0
    assert bao.lookup_accessor(olds[1]["wrapped_accessor"]) is None  # taken: the grace not kept
    assert bao.lookup_accessor(olds[0]["wrapped_accessor"]) is not None
    # Nobody unwraps the first pod's: its new wrapping token expires.
    eventually(lambda: bao.lookup_accessor(news[0]["accessor"]) is None, "the new wrapping token to expire",
               timeout=30)
    assert cli(node, "retry-revocations").returncode == 0
    assert bao.lookup_accessor(olds[0]["wrapped_accessor"]) is not None  # the only token the pod holds
    assert {olds[0]["wrapped_accessor"], olds[0]["accessor"]} == pending(node)  # until the hour is over
    for pod in (idle, taking):
        kubelet.teardown(pod)
    assert cli(node, "retry-revocations").returncode == 0  # the pod is gone: no grace kept
    assert bao.lookup_accessor(olds[0]["wrapped_accessor"]) is None and not pending(node)
    assert all(bao.lookup_accessor(n["wrapped_accessor"]) is None for n in news)


def test_rotate_names_what_it_rotates_and_skips_what_it_cannot(node, bao):
    kubelet = node.kubelet
    plain = new_pod("plain", namespace="shop")
    path = kubelet.publish(plain, {**NGINX, "vault/unwrap": "true"})
    remember_secret((path / "vault-token").read_text())
    before = read_volume(path)[1]
    [result] = rotate(node, "--pod-uid", plain.uid)
    assert result["outcome"] == "skipped" and "vault/unwrap" in result["why"]
    assert read_volume(path)[1] == before
    out = cli(node, "rotate")
    assert out.returncode != 0 and "--pod-uid" in out.stderr
    kubelet.teardown(plain)


def test_a_rotated_token_a_proxy_handed_back_unwrapped_is_revoked_and_the_volume_kept(node, bao):
    """A proxy that strips X-Vault-Wrap-TTL makes Vault answer the rotation's create with a plain token:
    no volume will hold it, so it is revoked at once (as a mount's is), and the pod keeps its token."""
    before = set(bao.accessors())
    pod = new_pod("stripped", namespace="shop")
    path = node.kubelet.publish(pod, NGINX)
    held = read_volume(path)
    with FaultServer(bao.addr) as proxy:
        proxy.add(CREATE, "strip-wrap-ttl")
        out = subprocess.run([*node.cmd, "rotate", "--json", "--pod-uid", pod.uid], capture_output=True, text=True,
                             env={**node.env, "VAULT_ADDR": proxy.addr}, timeout=120)
        assert proxy.count(CREATE) == 1
    assert out.returncode != 0, out.stdout + out.stderr
    [result] = json.loads(out.stdout)["volumes"]
    assert result["outcome"] == "failed" and "unwrapped" in result["error"] and "revoked" in result["error"], result
    assert read_volume(path) == held and not pending(node) and unrecorded(node, pod) == []
    assert pod_tokens_alive(bao, pod, before) == {held[1]["wrapped_accessor"]}
    node.kubelet.teardown(pod)
    assert pod_tokens_alive(bao, pod, before) == set()


def test_a_flexvolume_volume_rotates_the_same_way(kubelet, bao):
    """The other front end (and, through driver_cmd, the PyInstaller build): the same records, the same
    command."""
    pod = kubelet.new_pod("flex-rotated")
    reply, volume = kubelet.mount(pod, NGINX, fs_group=FS_GROUP)
    assert reply.ok, reply.body
    old = read_volume(volume)[1]
    mounted = bao.lookup_accessor(old["wrapped_accessor"])["meta"]
    out = subprocess.run([*kubelet.driver_cmd, "rotate", "--pod-uid", pod.uid, "--grace", "1s", "--json"],
                         capture_output=True, text=True, env=kubelet.env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    [result] = json.loads(out.stdout)["volumes"]
    assert result["outcome"] == "rotated" and old["wrapped_accessor"] not in out.stdout
    token, new = read_volume(volume)
    info = (volume / "vault-token").stat()
    assert info.st_gid == FS_GROUP and info.st_mode & 0o777 == 0o440
    auth = bao.unwrap(token)["auth"]
    remember_secret(auth["client_token"])
    assert auth["accessor"] == new["wrapped_accessor"] != old["wrapped_accessor"]
    assert auth["metadata"] == {**mounted, "rotated_from": old["wrapped_accessor"]} and "nginx" in auth["policies"]
    assert (mounted["pod_uid"], mounted["service_account"], mounted["volume"]) == (pod.uid, "default", "token")
    time.sleep(1.2)
    assert subprocess.run([*kubelet.driver_cmd, "retry-revocations"], env=kubelet.env, capture_output=True,
                          timeout=120).returncode == 0
    assert bao.lookup_accessor(old["wrapped_accessor"]) is None
    assert kubelet.teardown(volume).ok
    assert bao.lookup_accessor(new["wrapped_accessor"]) is None


def volume_state(path: Path, record_file: Path) -> tuple:
    """What a refused rotation must leave as it was: the volume's files (bytes, mode, group), its record."""
    files = {n: ((path / n).read_bytes(), (path / n).stat().st_mode, (path / n).stat().st_gid)
             for n in ("vault-token", "vault-token.json")}
    return files, record_file.read_text()


def record_file_of(root: Path, pod) -> Path:
    [found] = [p for p in (root / "state" / "volumes").glob("*.json") if json.loads(p.read_text()).get("pod_uid")
               == pod.uid]
    return found


def queue_and_intents(root: Path) -> tuple[set[str], set[str]]:
    return ({p.name for p in (root / "state" / "pending").glob("*.json")},
            {p.name for p in (root / "state" / "intents").glob("*.json")})


def test_a_rotation_mints_only_what_the_policy_bindings_in_force_now_allow(kubelet, bao, tmp_path):
    """The bindings are checked again before a rotation mints, with the service account the volume was
    mounted for (its record keeps it), as a mount checks them: once the admin took `nginx` from the
    namespace, a rotation is refused (naming the binding) and nothing is minted or changed. Allowed, the
    new token is named as the mount's was (the same metadata, `rotated_from` added; the same display name)."""
    bindings = tmp_path / "bindings.json"
    kubelet.env["VAULTTMPFS_POLICY_BINDINGS"] = write_bindings(
        bindings, {"bindings": [{"namespaces": ["shop"], "service_accounts": ["api"], "policies": ["nginx"]}]})
    pod = kubelet.new_pod("web", namespace="shop", service_account="api")
    reply, volume = kubelet.mount(pod, NGINX)
    assert reply.ok, reply.body
    old = read_volume(volume)[1]
    mounted = bao.lookup_accessor(old["wrapped_accessor"])
    assert mounted["meta"]["service_account"] == "api" and mounted["meta"]["volume"] == "token"
    assert mounted["display_name"] == "token-vaulttmpfs-shop-POD-web"

    def rotate_shop() -> subprocess.CompletedProcess:
        return subprocess.run([*kubelet.driver_cmd, "rotate", "--namespace", "shop", "--grace", "1s", "--json"],
                              capture_output=True, text=True, env=kubelet.env, timeout=120)

    out = rotate_shop()
    assert out.returncode == 0, out.stdout + out.stderr
    new = read_volume(volume)[1]
    rotated = bao.lookup_accessor(new["wrapped_accessor"])
    assert rotated["meta"] == {**mounted["meta"], "rotated_from": old["wrapped_accessor"]}
    assert rotated["display_name"] == mounted["display_name"]

    # The admin takes nginx away from namespace shop: a new mount there is refused, and so is a rotation.
    write_bindings(bindings, {"bindings": [{"name": "shop apps", "namespaces": ["shop"], "policies": ["other"]}]})
    record = record_file_of(kubelet.root, pod)
    held, minted, queued = volume_state(volume, record), set(bao.accessors()), queue_and_intents(kubelet.root)
    out = rotate_shop()
    assert out.returncode == 1, out.stdout + out.stderr
    [result] = json.loads(out.stdout)["volumes"]
    assert result["outcome"] == "failed", result
    assert result["error"].startswith("not rotated: policy 'nginx' is not bound to service account 'api' in "
                                      f"namespace 'shop' by {bindings}: binding #1 'shop apps'"), result
    assert "the volume keeps the token it holds" in result["error"]
    assert volume_state(volume, record) == held and queue_and_intents(kubelet.root) == queued
    assert set(bao.accessors()) == minted  # nothing minted
    assert bao.lookup_accessor(new["wrapped_accessor"]) is not None  # the pod's token untouched
    assert kubelet.teardown(volume).ok
    assert bao.lookup_accessor(new["wrapped_accessor"]) is None
    time.sleep(1.2)  # the first rotation's grace: its old tokens are owed now
    retry = kubelet.call_cli("retry-revocations")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert bao.lookup_accessor(old["wrapped_accessor"]) is None and bao.lookup_accessor(old["accessor"]) is None


def test_a_rotated_csi_token_is_named_as_the_mounts_was(node, bao):
    """The CSI target path ends in /mount: the rotated token's `volume` is the pod's name for the volume
    (as the mount's), and its `service_account` is kept."""
    pod = new_pod("named", namespace="shop", service_account="api")
    path = node.kubelet.publish(pod, NGINX)
    old = read_volume(path)[1]
    mounted = bao.lookup_accessor(old["wrapped_accessor"])
    assert (mounted["meta"]["volume"], mounted["meta"]["service_account"]) == ("vault", "api")
    [result] = rotate(node, "--pod-uid", pod.uid, "--grace", "1s")
    assert result["outcome"] == "rotated", result
    rotated = bao.lookup_accessor(read_volume(path)[1]["wrapped_accessor"])
    assert rotated["meta"] == {**mounted["meta"], "rotated_from": old["wrapped_accessor"]}
    assert rotated["display_name"] == mounted["display_name"] == "token-vaulttmpfs-shop-POD-named"
    node.kubelet.teardown(pod)
    time.sleep(1.2)
    assert cli(node, "retry-revocations").returncode == 0
    assert bao.lookup_accessor(old["wrapped_accessor"]) is None


def test_a_record_without_its_service_account_rotates_only_what_every_service_account_may_have(node, bao,
                                                                                               tmp_path):
    """A record an older version wrote names neither the service account nor the volume: checked without
    the service account, the rotation is refused when the bindings need it (and says so), allowed when
    they give the policy to every service account of the namespace; the volume is named from its path."""
    pod = new_pod("old-identity", namespace="shop", service_account="api")
    path = node.kubelet.publish(pod, NGINX)
    record = record_file_of(node.root, pod)
    written = json.loads(record.read_text())
    assert (written.pop("service_account"), written.pop("volume_name")) == ("api", "vault")
    record.write_text(json.dumps(written))
    old = read_volume(path)[1]
    mounted = bao.lookup_accessor(old["wrapped_accessor"])
    bindings = tmp_path / "bindings.json"

    def rotate_with(document) -> subprocess.CompletedProcess:
        return subprocess.run([*node.cmd, "rotate", "--json", "--pod-uid", pod.uid, "--grace", "1s"],
                              capture_output=True, text=True, timeout=120,
                              env={**node.env, "VAULTTMPFS_POLICY_BINDINGS": write_bindings(bindings, document)})

    held, minted = volume_state(path, record), set(bao.accessors())
    out = rotate_with({"bindings": [{"namespaces": ["shop"], "service_accounts": ["api"], "policies": ["nginx"]}]})
    assert out.returncode == 1, out.stdout + out.stderr
    [result] = json.loads(out.stdout)["volumes"]
    assert result["outcome"] == "failed" and "need the pod's service account, which the volume's record does " \
        "not name" in result["error"], result
    assert volume_state(path, record) == held and set(bao.accessors()) == minted

    out = rotate_with({"bindings": [{"namespaces": ["shop"], "policies": ["nginx"]}]})
    assert out.returncode == 0, out.stdout + out.stderr
    rotated = bao.lookup_accessor(read_volume(path)[1]["wrapped_accessor"])
    expected = {k: v for k, v in mounted["meta"].items() if k != "service_account"}  # not known
    assert rotated["meta"] == {**expected, "rotated_from": old["wrapped_accessor"]}
    node.kubelet.teardown(pod)
    time.sleep(1.2)
    assert cli(node, "retry-revocations").returncode == 0
    assert bao.lookup_accessor(old["wrapped_accessor"]) is None


def test_a_record_older_than_made_with_keeps_the_volumes_group(node, bao):
    """Records written before read_only/fs_group were kept: the rotated files keep the group they had."""
    kubelet = node.kubelet
    pod = new_pod("old-record", namespace="shop")
    path = kubelet.publish(pod, NGINX, fs_group=FS_GROUP)
    [record_file] = [p for p in (node.root / "state" / "volumes").glob("*.json")
                     if json.loads(p.read_text()).get("pod_uid") == pod.uid]
    record = json.loads(record_file.read_text())
    record.pop("read_only"), record.pop("fs_group")
    record_file.write_text(json.dumps(record))
    old = read_volume(path)[1]
    [result] = rotate(node, "--pod-uid", pod.uid, "--grace", "1s")
    assert result["outcome"] == "rotated", result
    info = (path / "vault-token").stat()
    assert info.st_gid == FS_GROUP and info.st_mode & 0o777 == 0o440
    assert read_volume(path)[1]["wrapped_accessor"] != old["wrapped_accessor"]
    kubelet.teardown(pod)
    time.sleep(1.2)
    assert cli(node, "retry-revocations").returncode == 0
    assert bao.lookup_accessor(old["wrapped_accessor"]) is None


# The changes a rotation makes to the node, in order (after the mint; tests/rotate_interrupted.py counts them).
STEPS = ("queue the new pod token", "queue the new wrapping token", "queue the old pod token",
         "queue the old wrapping token", "the record names the new tokens", "the new token file",
         "the new metadata file", "the new pod token leaves the queue", "the new wrapping token leaves the queue")


def rotate_interrupted(node: CsiNode, step: str, sig: str, *args: str, new_token_wait: float = 0.5) -> subprocess.Popen:
    """`vaulttmpfs rotate ARGS` sending itself SIG just before `step`; its new tokens wait `new_token_wait`
    seconds in the queue (not 5 minutes) for a retry that cannot tell whether the rotation is under way."""
    helper = str(REPO / "tests" / "rotate_interrupted.py")
    return subprocess.Popen([sys.executable, helper, str(STEPS.index(step)), sig, str(new_token_wait), *args],
                            env=node.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def record_of(node: CsiNode, pod) -> dict:
    [record] = [r for r in (json.loads(p.read_text()) for p in (node.root / "state" / "volumes").glob("*.json"))
                if r.get("pod_uid") == pod.uid]
    return record


def pod_tokens_alive(bao, pod, minted_since: set[str]) -> set[str]:
    """The accessors of this pod's tokens (metadata pod_uid) Vault holds alive, of those made since."""
    found = (bao.lookup_accessor(a) for a in set(bao.accessors()) - minted_since)
    return {t["accessor"] for t in found if t and (t.get("meta") or {}).get("pod_uid") == pod.uid}


def revoke_orphaned_wrapping_tokens(bao, minted_since: set[str]) -> None:
    """A rotation killed before its new wrapping token was queued leaves it recorded nowhere but in the
    intent (documented: it expires after VAULT_WRAP_TTL); once the pod is gone, the test revokes it."""
    for accessor in set(bao.accessors()) - minted_since:
        found = bao.lookup_accessor(accessor)
        if found and found.get("policies") == ["response-wrapping"]:
            bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})


def forget_their_volume(node: CsiNode) -> None:
    """The queue as an older vaulttmpfs wrote it: a rotation's entries did not name their volume."""
    for path in (node.root / "state" / "pending").glob("*.json"):
        entry = json.loads(path.read_text())
        entry.pop("mount_dir", None)
        path.write_text(json.dumps(entry))


def assert_the_pod_keeps_the_token_its_volume_names_and_nothing_else_lives(node, bao, pod, path, minted_since):
    time.sleep(1.2)  # past the grace (1s) and the new tokens' wait
    for _ in range(2):  # the first round may revoke the new wrapping token an old token watches
        assert cli(node, "retry-revocations").returncode == 0
    held = read_volume(path)[1]  # what the pod side reads
    record = record_of(node, pod)
    assert (record["accessor"], record["wrapping_accessor"]) == (held["wrapped_accessor"], held["accessor"])
    assert pod_tokens_alive(bao, pod, minted_since) == {held["wrapped_accessor"]}
    assert not pending(node)
    node.kubelet.teardown(pod)
    assert pod_tokens_alive(bao, pod, minted_since) == set()
    revoke_orphaned_wrapping_tokens(bao, minted_since)


@pytest.mark.parametrize("step", STEPS[1:], ids=[f"before {s}" for s in STEPS[1:]])
def test_a_rotation_killed_at_any_step_leaves_the_pod_the_token_its_volume_names_and_revokes_the_rest(node, bao,
                                                                                                       step):
    """Killed after the mint, before `step`: its queue entries must neither revoke the token the pod holds
    (the one its files and record name) nor keep any other of the pod's tokens alive once retried."""
    before = set(bao.accessors())
    pod = new_pod("killed", namespace="shop")
    path = node.kubelet.publish(pod, NGINX)
    killed = rotate_interrupted(node, step, "KILL", "--pod-uid", pod.uid, "--grace", "1s")
    assert killed.wait(timeout=120) == -signal.SIGKILL
    # Its note of the mint is dropped once both new tokens are queued (which revokes or keeps them).
    assert len(unrecorded(node, pod)) == (1 if step == "queue the new wrapping token" else 0)
    forget_unrecorded(node, pod)
    assert_the_pod_keeps_the_token_its_volume_names_and_nothing_else_lives(node, bao, pod, path, before)


def test_a_rotation_killed_between_its_mint_and_its_queue_leaves_its_new_token_counted_as_unrecorded(node, bao):
    """The one kill the queue cannot cover: right after Vault's answer to the mint, before the new tokens'
    first entry. As a mount's lost answer, the token then alive is noted (status, doctor, /metrics), with
    the time by which it has expired."""
    before = set(bao.accessors())
    pod = new_pod("killed-minted", namespace="shop")
    path = node.kubelet.publish(pod, NGINX)
    old = read_volume(path)[1]
    killed = rotate_interrupted(node, "queue the new pod token", "KILL", "--pod-uid", pod.uid)
    assert killed.wait(timeout=120) == -signal.SIGKILL
    assert not pending(node) and read_volume(path)[1] == old  # recorded nowhere else
    [create] = unrecorded(node, pod)
    assert (create["namespace"], create["pod"], create["policies"]) == ("shop", "killed-minted", ["nginx"])
    assert create["until"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    alive = pod_tokens_alive(bao, pod, before)
    assert len(alive) == 2 and old["wrapped_accessor"] in alive  # the new one is what the note is about
    node.kubelet.teardown(pod)
    for accessor in pod_tokens_alive(bao, pod, before):  # what nothing on the node can revoke
        bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
    revoke_orphaned_wrapping_tokens(bao, before)
    forget_unrecorded(node, pod)


@pytest.mark.parametrize("step", ["the record names the new tokens", "the new metadata file",
                                  "the new pod token leaves the queue"])
def test_a_killed_rotations_entries_written_before_they_named_their_volume_are_settled_the_same(node, bao, step):
    """An older vaulttmpfs's entries (no mount_dir): their volume is the one whose record names them."""
    before = set(bao.accessors())
    pod = new_pod("killed-old", namespace="shop")
    path = node.kubelet.publish(pod, NGINX)
    killed = rotate_interrupted(node, step, "KILL", "--pod-uid", pod.uid, "--grace", "1s")
    assert killed.wait(timeout=120) == -signal.SIGKILL
    forget_their_volume(node)
    assert_the_pod_keeps_the_token_its_volume_names_and_nothing_else_lives(node, bao, pod, path, before)


@pytest.mark.parametrize("step", ["the record names the new tokens", "the new token file"])
def test_an_unmount_after_a_killed_rotation_leaves_none_of_its_tokens_to_a_grace(node, bao, step):
    """The pod is gone: the retry after its unmount revokes what the rotation queued at once, neither the
    old token's grace (10m) nor the new tokens' wait (5m) kept."""
    before = set(bao.accessors())
    pod = new_pod("killed-then-gone", namespace="shop")
    node.kubelet.publish(pod, NGINX)
    killed = rotate_interrupted(node, step, "KILL", "--pod-uid", pod.uid, new_token_wait=300)
    assert killed.wait(timeout=120) == -signal.SIGKILL
    node.kubelet.teardown(pod)
    assert cli(node, "retry-revocations").returncode == 0
    assert pod_tokens_alive(bao, pod, before) == set() and not pending(node)


def test_a_retry_during_a_rotation_waits_for_it_and_keeps_its_new_token(node, bao):
    """The retry takes the volume's lock: a rotation under way (its new tokens' wait over) is never taken
    for a dead one."""
    before = set(bao.accessors())
    pod = new_pod("paused", namespace="shop")
    path = node.kubelet.publish(pod, NGINX)
    paused = rotate_interrupted(node, "the record names the new tokens", "STOP", "--pod-uid", pod.uid)
    retry = None
    try:
        eventually(lambda: Path(f"/proc/{paused.pid}/stat").read_text().split(") ")[1].startswith("T"),
                   "the rotation paused")
        time.sleep(0.6)  # past its new tokens' wait
        retry = subprocess.Popen([*node.cmd, "retry-revocations"], env=node.env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(1.5)
        assert retry.poll() is None  # waiting for the volume's lock
    finally:
        paused.send_signal(signal.SIGCONT)
        assert paused.wait(timeout=120) == 0
        if retry is not None:
            assert retry.wait(timeout=120) == 0
    new = read_volume(path)[1]
    assert bao.lookup_accessor(new["wrapped_accessor"]) is not None
    assert record_of(node, pod)["accessor"] == new["wrapped_accessor"]
    node.kubelet.teardown(pod)
    assert cli(node, "retry-revocations").returncode == 0
    assert pod_tokens_alive(bao, pod, before) == set() and not pending(node)


def test_a_rotation_that_fails_writing_the_metadata_file_puts_the_token_file_back(node, bao):
    """Step 5's undo: the token file already holds the new wrapping token when the metadata file's write
    fails (a full disk: ENOSPC); the undo revokes the new tokens, so the files are put back as they were
    (content, mode, group; still read-only), the record too, and the pod keeps its token."""
    before = set(bao.accessors())
    pod = new_pod("write-failed", namespace="shop")
    path = node.kubelet.publish(pod, NGINX, fs_group=FS_GROUP, read_only=True)
    names = ("vault-token", "vault-token.json")
    files = {n: ((path / n).read_bytes(), (path / n).stat().st_mode, (path / n).stat().st_gid) for n in names}
    old = read_volume(path)[1]
    failed = rotate_interrupted(node, "the new metadata file", "FAIL", "--pod-uid", pod.uid, "--json")
    assert failed.wait(timeout=120) == 1
    assert {n: ((path / n).read_bytes(), (path / n).stat().st_mode, (path / n).stat().st_gid)
            for n in names} == files
    assert "ro" in mount_entry(path)["options"]
    record = record_of(node, pod)
    assert (record["accessor"], record["wrapping_accessor"]) == (old["wrapped_accessor"], old["accessor"])
    assert pod_tokens_alive(bao, pod, before) == {old["wrapped_accessor"]} and not pending(node)
    assert bao.unwrap(read_volume(path)[0])["auth"]["accessor"] == old["wrapped_accessor"]  # the pod's, intact
    node.kubelet.teardown(pod)
    assert pod_tokens_alive(bao, pod, before) == set()


def test_a_rotation_whose_new_tokens_cannot_leave_the_queue_stands_and_the_retry_keeps_them(node, bao):
    """Once the metadata file names the new token the pod may take it: a failure after that (taking the
    new tokens off the queue, ENOSPC here) must not revoke it. The rotation is reported done; the retry
    keeps the tokens the volume's record names and revokes the old ones after the grace."""
    before = set(bao.accessors())
    pod = new_pod("dequeue-failed", namespace="shop")
    path = node.kubelet.publish(pod, NGINX)
    old = read_volume(path)[1]
    done = rotate_interrupted(node, "the new pod token leaves the queue", "FAIL", "--pod-uid", pod.uid,
                              "--grace", "1s")
    assert done.wait(timeout=120) == 0
    new = read_volume(path)[1]
    assert new["wrapped_accessor"] != old["wrapped_accessor"] and new["wrapped_accessor"] in pending(node)
    assert_the_pod_keeps_the_token_its_volume_names_and_nothing_else_lives(node, bao, pod, path, before)


def test_the_dashboard_shows_the_old_tokens_a_rotation_keeps_apart_from_the_revocations_owed():
    """The Grafana example graphs vaulttmpfs_rotation_revocations_waiting, in a query of its own (not
    added to the owed ones: a rotation's grace is no fault). tests/test_inventory.py parses its queries
    and checks each series is one the agent exports."""
    dashboard = json.loads((REPO / "installer" / "examples" / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    waiting = [e for e in exprs if "vaulttmpfs_rotation_revocations_waiting" in e]
    assert waiting and all("vaulttmpfs_pending_revocations" not in e for e in waiting)
