"""Least privilege around the driver (issue 15), tried for real: OpenBao with the shipped policy
files, `vaulttmpfs bootstrap` run as an operator runs it (source and build), real dirs, files and
symlinks on the node. Each test is an attack from the review that found these, and must fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .agents import AgentProcess
from .conftest import remember_secret
from .opsnode import admin_token, lookup, make_node
from .vaultserver import POLICIES, REPO, VaultHTTPError, VaultServer

FULL_POWER = 'path "*" { capabilities = ["create", "read", "update", "delete", "list", "sudo"] }'


@pytest.fixture(scope="module")
def cluster():
    """A cluster set up for vaulttmpfs from the shipped files, by a Vault operator (root here)."""
    with VaultServer() as server:
        remember_secret(server.root_token)
        for name in ("vaulttmpfs_admin_policy", "vaulttmpfs_setup_policy"):
            server.write_policy(name.replace("_policy", "").replace("_", "-"), (POLICIES / f"{name}.hcl").read_text())
        server.write_policy("payments-db", 'path "secret/data/payments/*" { capabilities = ["read"] }')
        server.setup_driver()
        server.write_role("vaulttmpfs-generator", **json.loads((POLICIES / "generator_role.json").read_text()))
        yield server


@pytest.fixture
def node(cluster, driver_cmd, tmp_path, log_dir):
    return make_node(cluster, driver_cmd, tmp_path, log_dir)


def vault_setup(server: VaultServer) -> dict:
    return {
        "policy": server.request("GET", "sys/policies/acl/token_generator")["data"]["policy"],
        "roles": {name: server.request("GET", f"auth/token/roles/{name}")["data"]
                  for name in ("applications", "vaulttmpfs-generator")},
        "admin": server.request("GET", "sys/policies/acl/vaulttmpfs-admin")["data"]["policy"],
    }


def token_with(server: VaultServer, *policies: str, **params) -> str:
    return remember_secret(server.create_token(policies=list(policies), ttl="10m", **params)["client_token"])


def alive(server: VaultServer, token: str) -> bool:
    try:
        lookup(server, token)
        return True
    except VaultHTTPError:
        return False


# --- 1. the vaulttmpfs-admin group cannot make itself (or nodes, or pods) more -----------------

ESCALATIONS = {
    "rewrite the generator policy": ("PUT", "sys/policies/acl/token_generator", {"policy": FULL_POWER}),
    "point the generator role at a foreign policy": (
        "POST", "auth/token/roles/vaulttmpfs-generator", {"allowed_policies": ["payments-db"]}),
    "widen the applications role": (
        "POST", "auth/token/roles/applications", {"allowed_policies": ["nginx", "other", "payments-db"]}),
    "rewrite its own policy": ("PUT", "sys/policies/acl/vaulttmpfs-admin", {"policy": FULL_POWER}),
    "a new role": ("POST", "auth/token/roles/mine", {"allowed_policies": ["payments-db"]}),
    "a foreign policy through the generator role": (
        "POST", "auth/token/create/vaulttmpfs-generator", {"policies": ["payments-db"]}),
    "a pod token through the applications role": (
        "POST", "auth/token/create/applications", {"policies": ["payments-db"]}),
    "an orphan of a foreign policy": ("POST", "auth/token/create-orphan", {"policies": ["payments-db"]}),
}


@pytest.mark.parametrize("attempt", ESCALATIONS)
def test_vaulttmpfs_admin_cannot_escalate(cluster, attempt):
    admin = token_with(cluster, "vaulttmpfs-admin", no_default_policy=True)
    before, tokens = vault_setup(cluster), set(cluster.accessors())
    method, path, body = ESCALATIONS[attempt]
    with pytest.raises(VaultHTTPError) as denied:
        cluster.request(method, path, body, token=admin)
    assert denied.value.status in (400, 403), denied.value
    assert vault_setup(cluster) == before
    assert set(cluster.accessors()) == tokens


def test_a_vaulttmpfs_admin_token_still_bootstraps_a_node(node, cluster):
    admin = token_with(cluster, "vaulttmpfs-admin", no_default_policy=True)
    proc = node.run("bootstrap", VAULT_TOKEN=admin)
    assert proc.returncode == 0, proc.stderr
    meta = lookup(cluster, node.token())
    assert meta["policies"] == ["token_generator"] and meta["path"] == "auth/token/create/vaulttmpfs-generator"
    node.assert_never_shown(admin, node.token())


def test_setup_vault_needs_the_operators_setup_policy(node, cluster):
    admin_only = admin_token(cluster)
    before, tokens = vault_setup(cluster), set(cluster.accessors())
    refused = node.run("bootstrap", "--setup-vault", VAULT_TOKEN=admin_only)
    assert refused.returncode == 1
    assert "vaulttmpfs-setup" in refused.stderr and "vaulttmpfs_setup_policy.hcl" in refused.stderr
    assert "Nothing was minted" in refused.stderr and not node.token_path.exists()
    assert set(cluster.accessors()) == tokens
    assert vault_setup(cluster) == before
    admin = token_with(cluster, "vaulttmpfs-setup", "vaulttmpfs-admin")  # a Vault operator's own, short-lived
    done = node.run("bootstrap", "--setup-vault", VAULT_TOKEN=admin)
    assert done.returncode == 0, done.stderr
    assert "token role vaulttmpfs-generator: unchanged" in done.stdout
    assert lookup(cluster, node.token())["policies"] == ["token_generator"]
    node.assert_never_shown(admin, node.token())


# --- 2. non-pod accessors stay out of output and logs ----------------------------------------------

def test_generator_accessors_are_never_shown_in_full(node, cluster):
    admin = admin_token(cluster)
    assert node.run("bootstrap", VAULT_TOKEN=admin).returncode == 0
    first = lookup(cluster, node.token())["accessor"]
    again = node.run("bootstrap", VAULT_TOKEN=admin)
    assert again.returncode == 1 and first[:8] in again.stderr
    forced = node.run("bootstrap", "--force", VAULT_TOKEN=admin)
    assert forced.returncode == 0, forced.stderr
    second = lookup(cluster, node.token())["accessor"]
    assert f"accessor {second[:8]}..." in forced.stdout and f"accessor {first[:8]}...) revoked" in forced.stdout
    renewed = node.run("renew-generator")
    assert renewed.returncode == 0 and second[:8] in renewed.stdout
    logged = node.log_file.read_text()
    for accessor in (first, second, lookup(cluster, admin)["accessor"]):
        assert all(accessor not in text for text in node.outputs), "a non-pod accessor was printed"
        assert accessor not in logged, "a non-pod accessor was logged"


# --- 4. the token dir and the file in it are root's only ---------------------------------------

@pytest.mark.parametrize("open_dir", ["token dir", "grandparent"])
def test_bootstrap_refuses_a_token_dir_others_can_change(node, cluster, open_dir):
    token_dir = node.token_path.parent
    token_dir.mkdir(parents=True)
    opened = token_dir if open_dir == "token dir" else token_dir.parent
    opened.chmod(0o777)
    admin = admin_token(cluster)
    tokens = set(cluster.accessors())
    proc = node.run("bootstrap", VAULT_TOKEN=admin)
    assert proc.returncode == 1
    assert f"directory {opened} is not trusted" in proc.stderr and f"chmod go-w {opened}" in proc.stderr
    assert not node.token_path.exists() and set(cluster.accessors()) == tokens
    opened.chmod(0o755)  # the fix it gives
    assert node.run("bootstrap", VAULT_TOKEN=admin).returncode == 0
    node.assert_never_shown(admin, node.token())


def test_a_sticky_root_owned_ancestor_is_accepted(node, cluster, tmp_path):
    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    node.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] = str(sticky / "vaulttmpfs" / "vaulttoken")
    node.token_path = sticky / "vaulttmpfs" / "vaulttoken"
    proc = node.run("bootstrap", VAULT_TOKEN=admin_token(cluster))
    assert proc.returncode == 0, proc.stderr
    node.assert_never_shown(node.token())


@pytest.mark.parametrize("plant", ["symlink", "other user's file", "fifo"])
def test_force_never_reads_through_a_planted_file(node, cluster, tmp_path, plant):
    operator = token_with(cluster, "token_generator", no_default_policy=True)  # would be revoked if followed
    elsewhere = tmp_path / "operator-token"
    elsewhere.write_text(operator + "\n")
    node.token_path.parent.mkdir(parents=True)
    if plant == "symlink":
        node.token_path.symlink_to(elsewhere)
    elif plant == "fifo":
        os.mkfifo(node.token_path)
    else:
        node.token_path.write_text(operator + "\n")
        os.chown(node.token_path, 65534, 65534)
    proc = node.run("bootstrap", "--force", VAULT_TOKEN=admin_token(cluster), timeout=30)
    assert proc.returncode == 1
    assert f"rm {node.token_path}" in proc.stderr
    assert alive(cluster, operator)
    node.assert_never_shown(operator)


# --- 5. --force revokes only a generator token ---------------------------------------------------

@pytest.mark.parametrize("foreign", ["an admin token", "a generator policy plus another", "a non-orphan"])
def test_force_refuses_to_revoke_a_token_that_is_not_a_generator(node, cluster, foreign):
    if foreign == "an admin token":
        held = token_with(cluster, "vaulttmpfs-admin", "payments-db")
        expect = "policies default,payments-db,vaulttmpfs-admin"
    elif foreign == "a generator policy plus another":
        held = token_with(cluster, "token_generator", "payments-db", no_default_policy=True)
        expect = "policies payments-db,token_generator"
    else:
        held = token_with(cluster, "token_generator", no_default_policy=True)  # a child of root
        expect = "not an orphan"
    node.token_path.parent.mkdir(parents=True, mode=0o700)
    node.token_path.write_text(held + "\n")
    node.token_path.chmod(0o600)
    proc = node.run("bootstrap", "--force", VAULT_TOKEN=admin_token(cluster))
    assert proc.returncode == 1
    assert "not a vaulttmpfs generator token" in proc.stderr and expect in proc.stderr
    assert "nothing was revoked" in proc.stderr
    assert alive(cluster, held)
    assert node.token_path.read_text().strip() == held
    node.assert_never_shown(held, lookup(cluster, held)["accessor"])


def test_force_replaces_a_hand_made_orphan_generator_token(node, cluster):
    old = token_with(cluster, "token_generator", no_default_policy=True, no_parent=True)
    node.token_path.parent.mkdir(parents=True, mode=0o700)
    node.token_path.write_text(old + "\n")
    node.token_path.chmod(0o600)
    proc = node.run("bootstrap", "--force", VAULT_TOKEN=admin_token(cluster))
    assert proc.returncode == 0, proc.stderr
    assert not alive(cluster, old)
    node.assert_never_shown(old, node.token())


# --- 6. tokens from the environment: stripped, checked, never shown --------------------------------

def test_a_vault_token_with_a_trailing_newline_works_and_is_never_shown(node, cluster):
    admin = admin_token(cluster)
    proc = node.run("bootstrap", VAULT_TOKEN=admin + "\n")  # as `kubectl create secret --from-file` leaves it
    assert proc.returncode == 0, proc.stderr
    assert lookup(cluster, node.token())["policies"] == ["token_generator"]
    node.assert_never_shown(admin, node.token())


@pytest.mark.parametrize("value", ["{} extra\n", "{}\r\nX-Other: 1", "\t{}\x7f"])
def test_a_malformed_vault_token_is_refused_without_showing_it(node, cluster, value):
    admin = admin_token(cluster)
    proc = node.run("bootstrap", VAULT_TOKEN=value.format(admin))
    assert proc.returncode == 1
    assert "VAULT_TOKEN is not a Vault token" in proc.stderr
    node.assert_never_shown(admin)


def test_a_header_value_never_reaches_an_error_message(node, cluster):
    admin = admin_token(cluster)
    marker = "ns-" + admin
    proc = node.run("bootstrap", VAULT_TOKEN=admin, VAULT_NAMESPACE=marker + "\n")
    assert proc.returncode == 1
    assert "details are not shown" in proc.stderr
    assert admin not in proc.stderr and admin not in node.log_file.read_text()


def test_the_log_masks_escaped_forms_of_a_secret(tmp_path):
    """A secret quoted by repr() or JSON inside a message (a "\\n" suffix, escaped quotes) is masked too."""
    secret = remember_secret("s.EscapedSecretValue1234567")
    log_file = tmp_path / "masking.log"
    script = f"""
from vaulttmpfs import log
from vaulttmpfs.config import Config
value = {secret!r} + "\\n"
log.secret(value)
log.configure(Config(log_file={str(log_file)!r}))
logger = log.get()
logger.error("bad header", error=f"header value: {{value!r}}", as_json={{"k": value}})
logger.error("nested", text=repr(repr(value)))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    written = log_file.read_text()
    assert "<redacted>" in written and "bad header" in written
    assert "EscapedSecretValue" not in written


def test_only_the_generator_token_dir_is_a_default_path():
    from vaulttmpfs.config import Config

    assert Config().generator_token_path == "/etc/vaulttmpfs/vaulttoken"
    kept = Config.from_env({"VAULTTMPFS_GENERATOR_TOKEN_PATH": "/etc/kubernetes/vaulttoken"})
    assert kept.generator_token_path == "/etc/kubernetes/vaulttoken"


def test_the_agent_logs_the_generator_accessor_by_prefix_only(cluster, driver_cmd, tmp_path, log_dir):
    from .conftest import driver_env

    auth = cluster.generator_token(ttl="1h")
    remember_secret(auth["client_token"])
    token_file = tmp_path / "vaulttoken"
    token_file.write_text(auth["client_token"] + "\n")
    token_file.chmod(0o600)
    root = tmp_path / "node"
    root.mkdir()
    env = driver_env(cluster, {"path": str(token_file)}, root, log_dir)
    with AgentProcess(driver_cmd, env, "--renew-interval", "1s") as agent:
        agent.wait_for(lambda s, b: s == 200 and b["services"]["generator"]["renewals"] >= 2, "two renewals")
        assert agent.terminate() == 0
    logged = Path(env["VAULTTMPFS_LOG_FILE"]).read_text()
    assert "generator token renewed" in logged and f"{auth['accessor'][:8]}..." in logged
    assert auth["accessor"] not in logged
