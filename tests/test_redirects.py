"""A token is never sent to where a redirect points.

hvac (requests under it) follows 307/308 and re-sends X-Vault-Token to the Location: any host, https ->
http too. Here a real listener on loopback answers every request with a redirect to a second listener
that records whether any request carrying X-Vault-Token reached it. It must not: every client of
vault/client.py (the driver exec as the kubelet runs it, the agent's CSI, the pod-side `token`) answers
the redirect with an error naming where it pointed, and nothing follows it.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from .conftest import driver_env, source_cmd, unmount_everything_under
from .csikubelet import new_pod
from .csinode import CsiNode
from .kubelet import Kubelet
from .pki import issue, make_ca
from .podside import FS_GROUP, out_dir, pod_env, token_argv, wrapping_token

NGINX = {"vault/policies": "nginx"}


class Listener:
    """A loopback HTTP(S) server. As a recorder it answers 200 {} and keeps, per request, its method,
    path and whether an X-Vault-Token came with it (never the value). As a redirector it answers every
    request with `status` and Location: <to><path>."""

    def __init__(self, redirect_to: str | None = None, status: int = 307, tls: ssl.SSLContext | None = None):
        self.seen: list[dict] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                listener.seen.append({"method": self.command, "path": self.path,
                                      "token": bool(self.headers.get("X-Vault-Token"))})
                if redirect_to:
                    self.send_response(status)
                    self.send_header("Location", redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _any  # noqa: N815 - http.server names them

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.addr = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Listener":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    with Listener() as listener:
        yield listener


@pytest.fixture(params=[307, 308])
def redirector(request, recorder):
    with Listener(redirect_to=recorder.addr, status=request.param) as listener:
        yield listener


def assert_nothing_followed(redirector: Listener, recorder: Listener, message: str, secrets: list[str]) -> None:
    assert redirector.seen, "the client never asked the redirecting node"
    assert [r for r in recorder.seen if r["token"]] == [], recorder.seen
    assert recorder.seen == [], "a redirect was followed"
    assert recorder.addr in message and "does not follow redirects" in message, message
    for secret in secrets:
        assert secret not in message


def generator_token(bao_generator: dict) -> str:
    return Path(bao_generator["path"]).read_text().strip()


def test_the_driver_exec_never_follows_a_redirect_with_the_generator_token(bao, generator, driver_cmd, tmp_path,
                                                                          log_dir, recorder, redirector):
    root = tmp_path / "node"
    root.mkdir()
    node = Kubelet(driver_cmd, driver_env(bao, generator, root, log_dir, VAULT_ADDR=redirector.addr), root)
    try:
        reply, path = node.mount(node.new_pod("redirected"), NGINX)
        assert not reply.ok, reply.body
        assert reply.exit_code == 1
        assert_nothing_followed(redirector, recorder, reply.message, [generator_token(generator), bao.root_token])
        assert not path.exists() or not any(path.iterdir())  # nothing mounted, nothing written
    finally:
        unmount_everything_under(root)


def test_https_redirected_to_http_sends_nothing_there(bao, generator, driver_cmd, tmp_path, log_dir, recorder):
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    issue(pki, "server", "ca", "/CN=vault.test", san="IP:127.0.0.1")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki / "server.pem", pki / "server.key")
    root = tmp_path / "node"
    root.mkdir()
    with Listener(redirect_to=recorder.addr, tls=tls) as redirector:
        assert redirector.addr.startswith("https://") and recorder.addr.startswith("http://")
        node = Kubelet(driver_cmd, driver_env(bao, generator, root, log_dir, VAULT_ADDR=redirector.addr,
                                              VAULT_CACERT=str(pki / "ca.pem")), root)
        try:
            reply, _ = node.mount(node.new_pod("downgraded"), NGINX)
            assert not reply.ok, reply.body
            assert_nothing_followed(redirector, recorder, reply.message, [generator_token(generator)])
        finally:
            unmount_everything_under(root)


def test_the_pods_token_command_never_sends_the_wrapping_token_where_a_redirect_points(
        kubelet, bao, driver_cmd, tmp_path, recorder, redirector):
    reply, volume = kubelet.mount(kubelet.new_pod("pod-side"), NGINX, fs_group=FS_GROUP)
    assert reply.ok, reply.body
    wrapped = wrapping_token(volume)
    try:
        out = out_dir(tmp_path)
        result = subprocess.run(token_argv(driver_cmd, volume, out), env=pod_env(redirector.addr),
                                capture_output=True, text=True, timeout=60, umask=0)
        assert result.returncode != 0, result.stderr
        assert_nothing_followed(redirector, recorder, result.stderr, [wrapped])
        assert not (out / "token").exists()
        # Not spent: the wrapping token is still there to unwrap from the real Vault.
        assert bao.request("POST", "sys/wrapping/lookup", {"token": wrapped})["data"]["creation_ttl"] > 0
    finally:
        assert kubelet.teardown(volume).ok


def test_the_agents_csi_publish_never_follows_a_redirect(bao, generator, tmp_path, log_dir, recorder):
    (tmp_path / "csi").mkdir()
    with Listener(redirect_to=recorder.addr) as redirector:
        node = CsiNode(source_cmd(), bao, generator, tmp_path / "csi", log_dir, VAULT_ADDR=redirector.addr,
                       VAULT_CLIENT_TIMEOUT="2s", VAULT_MAX_RETRIES="1")
        node.start()
        try:
            with pytest.raises(grpc.RpcError) as refused:
                node.kubelet.publish(new_pod("csi-redirected"), NGINX, timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert_nothing_followed(redirector, recorder, refused.value.details(), [generator_token(generator)])
            logged = node.log_file.read_text()
            assert generator_token(generator) not in logged
            assert json.loads(logged.splitlines()[-1])  # the agent's log is still one JSON event a line
        finally:
            node.stop()
