"""`vaulttmpfs bootstrap` and `vaulttmpfs renew-generator`, run as an operator runs them (from source
and the PyInstaller build), against a real slapd and a real OpenBao whose LDAP auth points at it;
then the driver mounts with the token they wrote, the way the kubelet calls it.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import stat
import time
from pathlib import Path

import pexpect
import pytest

from .conftest import driver_env, remember_secret, unmount_everything_under
from .kubelet import Kubelet, is_mount_point
from .ldapserver import LdapServer, User
from .opsnode import NODE, Node, admin_token, lookup, make_node
from .vaultserver import LDAP_BAO, POLICIES, VaultServer, free_port

ADMIN_GROUP = "vaulttmpfs-admins"
ALICE = User("alice", "alice-" + secrets.token_urlsafe(10), [ADMIN_GROUP])  # may bootstrap nodes
BOB = User("bob", "bob-" + secrets.token_urlsafe(10))  # a directory user without the vaulttmpfs-admin policy
NGINX = {"vault/policies": "nginx"}


@pytest.fixture(scope="module")
def ldap():
    with LdapServer([ALICE, BOB]) as server:
        for user in (ALICE, BOB):
            remember_secret(user.password)
        remember_secret(server.reader_password)
        yield server


@contextlib.contextmanager
def new_cluster(ldap: LdapServer):
    """A Vault as an operator finds it before vaulttmpfs: LDAP auth on, a group mapped to the
    vaulttmpfs-admin policy (from policies/), the apps' own policies; nothing of vaulttmpfs' yet."""
    with VaultServer(binary=str(LDAP_BAO) if LDAP_BAO.exists() else None) as server:
        remember_secret(server.root_token)
        if "ldap" not in server.request("GET", "sys/plugins/catalog")["data"]["auth"]:
            pytest.fail("this OpenBao has no built-in LDAP auth method (OpenBao 2.7 dropped it): "
                        f"`make ldap-bao` puts an OpenBao 2.6 server at {LDAP_BAO} (make test does)")
        server.request("POST", "sys/auth/ldap", {"type": "ldap"})
        server.request("POST", "auth/ldap/config", ldap.vault_config())
        server.write_policy("vaulttmpfs-admin", (POLICIES / "vaulttmpfs_admin_policy.hcl").read_text())
        server.write_policy("vaulttmpfs-setup", (POLICIES / "vaulttmpfs_setup_policy.hcl").read_text())
        server.request("POST", f"auth/ldap/groups/{ADMIN_GROUP}", {"policies": "vaulttmpfs-admin"})
        for app in ("nginx", "other"):
            server.write_policy(app, f'path "secret/data/{app}/*" {{ capabilities = ["read"] }}')
        yield server


@pytest.fixture(scope="module")
def cluster(ldap):
    """A cluster already set up for vaulttmpfs (what --setup-vault writes, written here by root)."""
    with new_cluster(ldap) as server:
        server.setup_driver()
        server.write_role("vaulttmpfs-generator", **json.loads((POLICIES / "generator_role.json").read_text()))
        yield server


@pytest.fixture
def node(cluster, driver_cmd, tmp_path, log_dir) -> Node:
    return make_node(cluster, driver_cmd, tmp_path, log_dir)


@contextlib.contextmanager
def kubelet_on(node: Node, server: VaultServer, tmp_path: Path, log_dir: Path):
    """The kubelet stand-in of test_driver, using the token file the node was bootstrapped with."""
    root = tmp_path / "node"
    root.mkdir(exist_ok=True)
    env = driver_env(server, {"path": str(node.token_path)}, root, log_dir)
    try:
        yield Kubelet(node.cmd, env, root)
    finally:
        unmount_everything_under(root)


def assert_token_mounts_a_pod(node: Node, server: VaultServer, tmp_path: Path, log_dir: Path) -> None:
    with kubelet_on(node, server, tmp_path, log_dir) as kubelet:
        reply, path = kubelet.mount(kubelet.new_pod("web"), NGINX)
        assert reply.ok, reply.body
        wrapping = remember_secret((path / "vault-token").read_text())
        auth = server.unwrap(wrapping)["auth"]
        remember_secret(auth["client_token"])
        assert sorted(auth["policies"]) == ["default", "nginx"]
        assert kubelet.teardown(path).ok
        assert server.lookup_accessor(auth["accessor"]) is None


def setup_token(server: VaultServer) -> str:
    """A Vault operator's own short-lived token for `--setup-vault` (the admin group may only mint)."""
    return remember_secret(server.create_token(policies=["vaulttmpfs-setup", "vaulttmpfs-admin"], ttl="10m",
                                               display_name="vault-operator")["client_token"])


def dead_generator_token(server: VaultServer, how: str) -> str:
    auth = server.generator_token(ttl="2s" if how == "expired" else "1h")
    token = remember_secret(auth["client_token"])
    if how == "revoked":
        server.revoke_token(token)
    deadline = time.monotonic() + 30
    while server.lookup_accessor(auth["accessor"]) is not None:
        assert time.monotonic() < deadline, "the token did not expire"
        time.sleep(0.5)
    return token


def write_token_file(path: Path, token: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    path.chmod(mode)


# --- LDAP ---
@pytest.mark.parametrize("password_from", ["stdin", "password-file"])
def test_ldap_bootstrap_without_a_terminal_gives_a_token_that_mounts(node, cluster, tmp_path, log_dir,
                                                                     password_from):
    before = set(cluster.accessors())
    if password_from == "stdin":
        proc = node.bootstrap_ldap(ALICE)
    else:
        secret_file = tmp_path / "ldap-password"
        secret_file.write_text(ALICE.password + "\n")
        proc = node.run("bootstrap", "--username", "alice", "--password-file", str(secret_file))
    assert proc.returncode == 0, proc.stderr
    assert f"generator token written to {node.token_path}" in proc.stdout

    info = node.token_path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
    assert stat.S_IMODE(node.token_path.parent.stat().st_mode) == 0o700
    token = node.token()
    meta = lookup(cluster, token)
    assert meta["policies"] == ["token_generator"]
    assert meta["orphan"] is True and meta["renewable"] is True
    assert meta["path"] == "auth/token/create/vaulttmpfs-generator"
    assert meta["creation_ttl"] == 24 * 3600  # the role's period, 24h
    assert meta["display_name"] == f"token-vaulttmpfs-{NODE}"  # Vault prefixes "token-"
    assert meta["meta"] == {"node": NODE, "bootstrap": "ldap", "bootstrapped_by": "alice"}
    # Any generator token may revoke any token by accessor: a node's is shown by its prefix only.
    assert f"accessor {meta['accessor'][:8]}..." in proc.stdout and meta["accessor"] not in proc.stdout
    # Only the generator token is left: alice's LDAP login token was revoked after use.
    assert set(cluster.accessors()) - before == {meta["accessor"]}

    assert_token_mounts_a_pod(node, cluster, tmp_path, log_dir)
    node.assert_never_shown(token, ALICE.password)


def test_ldap_bootstrap_on_a_terminal_prompts_and_hides_the_password(node, cluster):
    transcript = io.StringIO()
    child = pexpect.spawn(node.cmd[0], [*node.cmd[1:], "bootstrap"], env=node.env, encoding="utf-8", timeout=60)
    child.logfile_read = transcript
    child.expect("LDAP username: ")
    child.sendline("alice")
    child.expect("LDAP password: ")
    child.sendline(ALICE.password)
    child.expect(pexpect.EOF)
    child.close()
    node.outputs.append(transcript.getvalue())
    assert child.exitstatus == 0, transcript.getvalue()
    assert "alice" in transcript.getvalue()  # the username echoes as typed...
    assert ALICE.password not in transcript.getvalue()  # ...the password does not
    assert f"generator token written to {node.token_path}" in transcript.getvalue()
    meta = lookup(cluster, node.token())
    assert meta["policies"] == ["token_generator"] and meta["meta"]["bootstrapped_by"] == "alice"
    node.assert_never_shown(node.token(), ALICE.password)


@pytest.mark.parametrize("user, password", [("alice", "not-her-password"), ("mallory", "no-such-user")])
def test_wrong_ldap_credentials_are_a_clear_error(node, cluster, user, password):
    before = set(cluster.accessors())
    proc = node.bootstrap_ldap(User(user, password))
    assert proc.returncode == 1
    assert f"LDAP user '{user}'" in proc.stderr and "wrong username or password" in proc.stderr
    assert not node.token_path.exists()
    assert set(cluster.accessors()) == before
    node.assert_never_shown(password)


def test_ldap_user_without_the_admin_policy_is_told_what_is_missing(node, cluster):
    before = set(cluster.accessors())
    proc = node.bootstrap_ldap(BOB)
    assert proc.returncode == 1
    assert "permission denied" in proc.stderr and "vaulttmpfs-admin" in proc.stderr
    assert not node.token_path.exists()
    assert set(cluster.accessors()) == before  # bob's login token was revoked too
    node.assert_never_shown(BOB.password)


def test_ldap_auth_not_enabled_at_the_mount(node):
    proc = node.bootstrap_ldap(ALICE, "--ldap-mount", "corp-ldap")
    assert proc.returncode == 1
    assert "LDAP auth is not enabled at auth/corp-ldap" in proc.stderr
    assert not node.token_path.exists()


def test_vault_unreachable_is_a_clear_error(node):
    started = time.monotonic()
    proc = node.bootstrap_ldap(ALICE, VAULT_ADDR=f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    assert "cannot reach Vault" in proc.stderr
    assert time.monotonic() - started < 30
    assert not node.token_path.exists()


def test_without_a_terminal_the_username_must_be_given(node):
    proc = node.run("bootstrap", input=ALICE.password + "\n")
    assert proc.returncode != 0
    assert "--username" in proc.stderr
    assert not node.token_path.exists()


# --- VAULT_TOKEN, root ---
def test_bootstrap_with_vault_token(node, cluster):
    admin = admin_token(cluster)
    proc = node.run("bootstrap", VAULT_TOKEN=admin)
    assert proc.returncode == 0, proc.stderr
    token = node.token()
    meta = lookup(cluster, token)
    assert meta["policies"] == ["token_generator"] and meta["orphan"] is True
    assert meta["meta"] == {"node": NODE, "bootstrap": "token", "bootstrapped_by": "token-ops"}
    assert stat.S_IMODE(node.token_path.stat().st_mode) == 0o600
    assert lookup(cluster, admin)["policies"] == ["default", "vaulttmpfs-admin"]  # the operator's token is theirs
    node.assert_never_shown(token, admin)


@pytest.mark.parametrize("case", ["root VAULT_TOKEN", "--policy root"])
def test_root_is_refused(node, cluster, case):
    admin = admin_token(cluster)
    before = set(cluster.accessors())
    if case == "root VAULT_TOKEN":
        proc = node.run("bootstrap", VAULT_TOKEN=cluster.root_token)
    else:
        proc = node.run("bootstrap", "--policy", "root", VAULT_TOKEN=admin)
    assert proc.returncode == 1
    assert "root policy" in proc.stderr and "vaulttmpfs-admin" in proc.stderr
    assert not node.token_path.exists()
    assert set(cluster.accessors()) == before
    node.assert_never_shown(cluster.root_token)


def test_a_live_token_is_replaced_only_with_force(node, cluster):
    admin = admin_token(cluster)
    assert node.run("bootstrap", VAULT_TOKEN=admin).returncode == 0
    first = node.token()
    first_accessor = lookup(cluster, first)["accessor"]

    again = node.run("bootstrap", VAULT_TOKEN=admin)
    assert again.returncode == 1
    assert "live generator token" in again.stderr and "--force" in again.stderr and first_accessor[:8] in again.stderr
    assert node.token() == first

    forced = node.run("bootstrap", "--force", VAULT_TOKEN=admin)
    assert forced.returncode == 0, forced.stderr
    second = node.token()
    assert second != first
    assert cluster.lookup_accessor(first_accessor) is None  # the replaced token is revoked
    assert f"accessor {first_accessor[:8]}...) revoked" in forced.stdout

    cluster.revoke_token(second)  # a dead token in the file is replaced without --force
    assert node.run("bootstrap", VAULT_TOKEN=admin).returncode == 0
    assert lookup(cluster, node.token())["policies"] == ["token_generator"]
    node.assert_never_shown(first, second, node.token(), admin)


# --- --setup-vault ---
def snapshot(server: VaultServer) -> dict:
    return {
        "policy": server.request("GET", "sys/policies/acl/token_generator")["data"]["policy"],
        "applications": server.request("GET", "auth/token/roles/applications")["data"],
        "generator": server.request("GET", "auth/token/roles/vaulttmpfs-generator")["data"],
    }


def test_setup_vault_makes_a_new_cluster_ready_and_is_idempotent(ldap, driver_cmd, tmp_path, log_dir):
    with new_cluster(ldap) as fresh:
        node = make_node(fresh, driver_cmd, tmp_path, log_dir)
        operator = setup_token(fresh)
        denied = node.bootstrap_ldap(ALICE, "--setup-vault")  # the admin group may not set Vault up
        assert denied.returncode == 1 and "vaulttmpfs-setup" in denied.stderr
        first = node.run("bootstrap", "--setup-vault", VAULT_TOKEN=operator)
        assert first.returncode == 0, first.stderr
        assert "policy token_generator: created from" in first.stdout
        assert "token role applications: created" in first.stdout
        assert "token role vaulttmpfs-generator: created" in first.stdout
        state = snapshot(fresh)
        assert state["policy"] == (POLICIES / "token_generator_policy.hcl").read_text()
        shipped_role = json.loads((POLICIES / "applications_role.json").read_text())
        assert state["applications"]["allowed_policies"] == shipped_role["allowed_policies"]
        assert state["applications"]["orphan"] is True and state["applications"]["token_period"] == 3600
        assert state["generator"]["allowed_policies"] == ["token_generator"]
        assert state["generator"]["orphan"] is True and state["generator"]["token_period"] == 24 * 3600
        assert_token_mounts_a_pod(node, fresh, tmp_path, log_dir)  # one command from nothing to a working node

        second = node.run("bootstrap", "--setup-vault", "--force", VAULT_TOKEN=operator)
        assert second.returncode == 0, second.stderr
        assert "policy token_generator: unchanged" in second.stdout
        assert "token role applications: exists; left as it is" in second.stdout
        assert "token role vaulttmpfs-generator: unchanged" in second.stdout
        assert snapshot(fresh) == state

        # --period: written into the generator role by --setup-vault; without it, a mismatch is refused.
        before = set(fresh.accessors())
        refused = node.bootstrap_ldap(ALICE, "--period", "2h", "--force")
        assert refused.returncode == 1
        assert "--setup-vault --period 2h" in refused.stderr
        assert set(fresh.accessors()) == before
        changed = node.run("bootstrap", "--setup-vault", "--period", "2h", "--force", VAULT_TOKEN=operator)
        assert changed.returncode == 0, changed.stderr
        assert "token role vaulttmpfs-generator: updated (period 2h)" in changed.stdout
        assert lookup(fresh, node.token())["creation_ttl"] == 2 * 3600
        node.assert_never_shown(node.token(), ALICE.password, fresh.root_token, operator)


def test_setup_vault_keeps_what_the_operator_changed(node, cluster):
    cluster.write_policy("token_generator", (POLICIES / "token_generator_policy.hcl").read_text()
                         + '\npath "auth/token/create/batch" { capabilities = ["update"] }\n')
    try:
        proc = node.run("bootstrap", "--setup-vault", VAULT_TOKEN=setup_token(cluster))
        assert proc.returncode == 0, proc.stderr
        assert "policy token_generator: exists and differs from" in proc.stdout
        assert "auth/token/create/batch" in snapshot(cluster)["policy"]
        assert snapshot(cluster)["applications"]["allowed_policies"] == ["nginx", "other"]
    finally:
        cluster.write_policy("token_generator", (POLICIES / "token_generator_policy.hcl").read_text())


def test_setup_vault_without_the_policy_files_says_where_to_point(node, cluster, tmp_path):
    proc = node.run("bootstrap", "--setup-vault", "--policies-dir", str(tmp_path / "nowhere"),
                    VAULT_TOKEN=admin_token(cluster))
    assert proc.returncode == 1
    assert "token_generator_policy.hcl" in proc.stderr and "--policies-dir" in proc.stderr
    assert not node.token_path.exists()


# --- renew-generator and the driver with a bad generator token ---
def test_renew_generator_extends_the_ttl(node, cluster):
    assert node.run("bootstrap", VAULT_TOKEN=admin_token(cluster)).returncode == 0
    token = node.token()
    time.sleep(2)  # let the TTL run down a little
    before = lookup(cluster, token)["ttl"]
    proc = node.run("renew-generator")
    assert proc.returncode == 0, proc.stderr
    assert "renewed" in proc.stdout and lookup(cluster, token)["accessor"][:8] in proc.stdout
    after = lookup(cluster, token)["ttl"]
    assert after > before and after >= 24 * 3600 - 2
    node.assert_never_shown(token)


@pytest.mark.parametrize("how", ["expired", "revoked"])
def test_renew_generator_fails_on_a_dead_token_and_says_what_to_run(node, cluster, how):
    token = dead_generator_token(cluster, how)
    write_token_file(node.token_path, token)
    proc = node.run("renew-generator")
    assert proc.returncode == 1
    assert "expired or revoked" in proc.stderr and "vaulttmpfs bootstrap" in proc.stderr
    assert str(node.token_path) in proc.stderr
    node.assert_never_shown(token)


def test_expired_generator_token_fails_the_mount_saying_what_to_run(node, cluster, tmp_path, log_dir):
    token = dead_generator_token(cluster, "expired")
    write_token_file(node.token_path, token)
    with kubelet_on(node, cluster, tmp_path, log_dir) as kubelet:
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        node.outputs.append(reply.output.decode())
    assert reply.status == "Failure" and reply.exit_code == 1
    assert str(node.token_path) in reply.message
    assert "vaulttmpfs renew-generator" in reply.message and "vaulttmpfs bootstrap" in reply.message
    assert not is_mount_point(path)
    node.assert_never_shown(token)


def test_group_readable_token_file_is_refused_by_driver_and_renewal(node, cluster, tmp_path, log_dir):
    assert node.run("bootstrap", VAULT_TOKEN=admin_token(cluster)).returncode == 0
    node.token_path.chmod(0o640)
    with kubelet_on(node, cluster, tmp_path, log_dir) as kubelet:
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.status == "Failure"
        assert str(node.token_path) in reply.message and f"chmod 600 {node.token_path}" in reply.message
        assert not is_mount_point(path)
        renew = node.run("renew-generator")
        assert renew.returncode == 1 and f"chmod 600 {node.token_path}" in renew.stderr

        node.token_path.chmod(0o600)  # the fix the message gives
        reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
        assert reply.ok, reply.body
        assert kubelet.teardown(path).ok
    node.assert_never_shown(node.token())
