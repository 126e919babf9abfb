"""VAULT_CLIENT_CERT / VAULT_CLIENT_KEY: Vault behind a TLS listener that requires client certificates.

A real OpenBao with an extra listener (`tls_require_and_verify_client_cert`), certificates made
by the openssl CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import driver_env, token_file, unmount_everything_under
from .kubelet import Kubelet, is_mount_point
from .pki import issue, make_ca
from .vaultserver import VaultServer, free_port

NGINX = {"vault/policies": "nginx"}


def make_pki(directory: Path) -> None:
    make_ca(directory, "ca")
    issue(directory, "server", "ca", "/CN=vault.test", san="IP:127.0.0.1")
    issue(directory, "client", "ca", "/CN=node-1")


@pytest.fixture(scope="module")
def mtls_bao(tmp_path_factory):
    pki = tmp_path_factory.mktemp("pki")
    make_pki(pki)
    port = free_port()
    (pki / "listener.hcl").write_text(f'''
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{pki}/server.pem"
  tls_key_file = "{pki}/server.key"
  tls_client_ca_file = "{pki}/ca.pem"
  tls_require_and_verify_client_cert = true
}}
''')
    with VaultServer(extra_args=[f"-config={pki / 'listener.hcl'}"]) as server:
        server.setup_driver()
        generator = {"path": token_file(pki, server.generator_token()["client_token"])}
        yield {"server": server, "pki": pki, "addr": f"https://127.0.0.1:{port}", "generator": generator}


@pytest.fixture
def mtls_kubelet(mtls_bao, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    pki = mtls_bao["pki"]
    env = driver_env(mtls_bao["server"], mtls_bao["generator"], root, log_dir,
                     VAULT_ADDR=mtls_bao["addr"], VAULT_CACERT=str(pki / "ca.pem"))
    node = Kubelet(driver_cmd, env, root)
    yield node
    unmount_everything_under(root)


def test_client_certificate_is_presented(mtls_kubelet, mtls_bao):
    pki = mtls_bao["pki"]
    mtls_kubelet.env.update(VAULT_CLIENT_CERT=str(pki / "client.pem"), VAULT_CLIENT_KEY=str(pki / "client.key"))
    reply, path = mtls_kubelet.mount(mtls_kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    assert (path / "ca.crt").read_bytes() == (pki / "ca.pem").read_bytes()
    accessor = json.loads((path / "vault-token.json").read_text())["wrapped_accessor"]
    reply = mtls_kubelet.unmount(path)
    assert reply.ok and "revoked" in reply.message, reply.body
    assert mtls_bao["server"].lookup_accessor(accessor) is None


def test_without_client_certificate_the_handshake_fails_cleanly(mtls_kubelet):
    reply, path = mtls_kubelet.mount(mtls_kubelet.new_pod(), NGINX)
    assert reply.status == "Failure" and reply.exit_code == 1
    assert mtls_kubelet.env["VAULT_ADDR"] in reply.message
    assert not is_mount_point(path)
