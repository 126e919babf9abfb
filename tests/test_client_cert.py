"""VAULT_CLIENT_CERT / VAULT_CLIENT_KEY: Vault behind a TLS listener that requires client certificates.

A real OpenBao with an extra listener (`tls_require_and_verify_client_cert`), certificates made
by the openssl CLI.
"""

from __future__ import annotations

import json

import pytest

from .conftest import driver_env, unmount_everything_under
from .kubelet import Kubelet, is_mount_point

NGINX = {"vault/policies": "nginx"}


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
