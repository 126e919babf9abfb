"""Bootstrap without SSH: the agent logs in to real OpenBao `jwt` auth with its service-account JWT
(signed here, as the API server would), writes the generator token, renews it, and replaces it
after it is revoked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .agents import AgentProcess
from .conftest import driver_env, on_source_and_build, remember_secret
from .jwtsign import Signer
from .kubelet import Kubelet
from .vaultserver import VaultHTTPError

SUBJECT = "system:serviceaccount:vaulttmpfs:vaulttmpfs"
ROLE = "vaulttmpfs-node"
MAX_TTL_ROLE = "vaulttmpfs-node-max-ttl"
NGINX = {"vault/policies": "nginx"}


@pytest.fixture(scope="module")
def jwt_auth(bao, tmp_path_factory) -> Signer:
    """auth/jwt trusting our signing key; a role bound to the DaemonSet's service account."""
    signer = Signer(tmp_path_factory.mktemp("jwt"))
    try:
        bao.request("POST", "sys/auth/jwt", {"type": "jwt"})
    except VaultHTTPError as exc:
        assert "path is already in use" in exc.body
    bao.request("POST", "auth/jwt/config", {"jwt_validation_pubkeys": [signer.public_pem]})
    bao.request("POST", f"auth/jwt/role/{ROLE}", {
        "role_type": "jwt", "user_claim": "sub", "bound_subject": SUBJECT, "bound_audiences": ["vault"],
        "token_policies": ["token_generator"], "token_no_default_policy": True, "token_period": "1h",
        "token_type": "service"})
    return signer


@pytest.fixture(scope="module")
def max_ttl_role(bao, jwt_auth) -> str:
    """As ROLE, but its tokens get 8 s a renewal and live 20 s at most."""
    bao.request("POST", f"auth/jwt/role/{MAX_TTL_ROLE}", {
        "role_type": "jwt", "user_claim": "sub", "bound_subject": SUBJECT, "bound_audiences": ["vault"],
        "token_policies": ["token_generator"], "token_no_default_policy": True, "token_ttl": "8s",
        "token_max_ttl": "20s", "token_type": "service"})
    return MAX_TTL_ROLE

def token_in(path: Path) -> str:
    return path.read_text().strip()


def test_agent_logs_in_renews_and_replaces_a_revoked_token(bao, jwt_auth, driver_cmd, tmp_path, log_dir):
    jwt_path = tmp_path / "sa" / "token"
    jwt_path.parent.mkdir()
    jwt_path.write_text(remember_secret(jwt_auth.token(SUBJECT)))
    token_path = tmp_path / "generator" / "vaulttoken"  # does not exist: the agent makes it
    root = tmp_path / "node"
    root.mkdir()
    env = driver_env(bao, {"path": str(token_path)}, root, log_dir, VAULTTMPFS_AUTH_ROLE=ROLE,
                     VAULTTMPFS_AUTH_JWT_PATH=str(jwt_path), VAULTTMPFS_RENEW_INTERVAL="1s",
                     VAULTTMPFS_LOG_FILE=str(tmp_path / "agent.log"))
    with AgentProcess(driver_cmd, env) as agent:
        body = agent.wait_for(lambda s, b: s == 200, "a generator token from the JWT login")
        info = os.stat(token_path)
        assert (info.st_mode & 0o777, info.st_uid) == (0o600, os.geteuid())
        first = remember_secret(token_in(token_path))
        looked_up = bao.request("GET", "auth/token/lookup-self", token=first)["data"]
        assert looked_up["policies"] == ["token_generator"] and looked_up["meta"]["role"] == ROLE
        assert body["services"]["generator"]["logins"] == 1

        # The token works for the driver, and the agent keeps renewing it.
        node = Kubelet(driver_cmd, env, root)
        reply, path = node.mount(node.new_pod(), NGINX)
        assert reply.ok, reply.body
        assert node.unmount(path).ok
        agent.wait_for(lambda s, b: b["services"]["generator"]["renewals"] >= 2, "two renewals")
        assert bao.lookup_accessor(looked_up["accessor"])["last_renewal_time"] > 0
        assert token_in(token_path) == first  # renewed, not replaced

        bao.revoke_token(first)  # e.g. an operator revoking the node
        agent.wait_for(lambda s, b: s == 200 and b["services"]["generator"]["logins"] == 2, "a second login")
        second = remember_secret(token_in(token_path))
        assert second != first and (os.stat(token_path).st_mode & 0o777) == 0o600
        assert bao.request("GET", "auth/token/lookup-self", token=second)["data"]["policies"] == ["token_generator"]
        reply, path = node.mount(node.new_pod(), NGINX)
        assert reply.ok, reply.body
        assert node.unmount(path).ok
        assert agent.terminate() == 0
    logged = (tmp_path / "agent.log").read_text()
    assert "logged in for a generator token" in logged
    assert first not in logged and second not in logged and token_in(jwt_path) not in logged
    bao.revoke_token(second)


def test_a_jwt_for_another_service_account_gets_no_token(bao, jwt_auth, driver_cmd, tmp_path, log_dir):
    jwt_path = tmp_path / "token"
    jwt_path.write_text(remember_secret(jwt_auth.token("system:serviceaccount:shop:web")))
    token_path = tmp_path / "generator" / "vaulttoken"
    env = driver_env(bao, {"path": str(token_path)}, tmp_path, log_dir, VAULTTMPFS_AUTH_ROLE=ROLE,
                     VAULTTMPFS_AUTH_JWT_PATH=str(jwt_path), VAULTTMPFS_RENEW_INTERVAL="1s")
    with AgentProcess(driver_cmd, env) as agent:
        body = agent.wait_for(lambda s, b: s == 503 and b["services"]["generator"].get("failures", 0) >= 1,
                              "a refused login")
        error = body["services"]["generator"]["last_error"]
        assert "auth/jwt" in error and "logging in failed" in error, error
        assert not token_path.exists()
        jwt_path.unlink()  # no projected token mounted: said so, by setting name
        body = agent.wait_for(lambda s, b: "VAULTTMPFS_AUTH_JWT_PATH" in str(b["services"]["generator"]["last_error"]),
                              "the missing JWT named", timeout=30)
        assert agent.terminate() == 0


def test_no_token_is_written_where_others_could_swap_it(bao, jwt_auth, driver_cmd, tmp_path, log_dir):
    jwt_path = tmp_path / "token"
    jwt_path.write_text(remember_secret(jwt_auth.token(SUBJECT)))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could rename the token file away and plant their own
    token_path = shared / "vaulttoken"
    env = driver_env(bao, {"path": str(token_path)}, tmp_path, log_dir, VAULTTMPFS_AUTH_ROLE=ROLE,
                     VAULTTMPFS_AUTH_JWT_PATH=str(jwt_path), VAULTTMPFS_RENEW_INTERVAL="1s")
    before = set(bao.accessors())
    with AgentProcess(driver_cmd, env) as agent:
        body = agent.wait_for(lambda s, b: s == 503 and b["services"]["generator"].get("failures", 0) >= 1,
                              "a refused write")
        assert "is not trusted" in body["services"]["generator"]["last_error"]
        assert not token_path.exists()
        assert agent.terminate() == 0
    minted = [bao.lookup_accessor(a) for a in set(bao.accessors()) - before]
    assert not [m for m in minted if m and (m.get("meta") or {}).get("role") == ROLE]  # each login revoked


def test_an_agent_restarted_logs_in_again_before_the_tokens_max_ttl(bao, jwt_auth, max_ttl_role, tmp_path, log_dir):
    """An agent restarted on a token another run logged in for knew no login lease (0), so it never saw
    renewals fall short: it renewed the token to its max TTL, and mounts were refused until the next
    round found it expired."""
    on_source_and_build(lambda kind, driver_cmd: logs_in_before_max_ttl(bao, jwt_auth, driver_cmd, tmp_path / kind,
                                                                        log_dir))


def logs_in_before_max_ttl(bao, jwt_auth, driver_cmd, tmp_path, log_dir):
    jwt_path = tmp_path / "sa" / "token"
    jwt_path.parent.mkdir(parents=True)
    jwt_path.write_text(remember_secret(jwt_auth.token(SUBJECT)))
    token_path = tmp_path / "generator" / "vaulttoken"
    root = tmp_path / "node"
    root.mkdir()
    env = driver_env(bao, {"path": str(token_path)}, root, log_dir, VAULTTMPFS_AUTH_ROLE=MAX_TTL_ROLE,
                     VAULTTMPFS_AUTH_JWT_PATH=str(jwt_path))
    with AgentProcess(driver_cmd, env, log_file=tmp_path / "first.log") as first:
        first.wait_for(lambda s, b: s == 200 and b["services"]["generator"]["logins"] == 1, "a first login")
        assert first.terminate() == 0
    token = remember_secret(token_in(token_path))
    accessor = bao.request("GET", "auth/token/lookup-self", token=token)["data"]["accessor"]

    with AgentProcess(driver_cmd, env, log_file=tmp_path / "restarted.log") as restarted:
        [login] = restarted.wait_for_event("logged in for a generator token", timeout=40)
        assert login["why"].startswith("renewal gave only"), login["why"]  # not "Vault refused" it: expired
        assert bao.lookup_accessor(accessor) is None  # revoked once replaced
        assert token_in(token_path) != token
        assert restarted.terminate() == 0
    bao.revoke_token(remember_secret(token_in(token_path)))
