"""Leader failover, a sealed node and a hung node, against a real 3-node OpenBao Raft cluster
(tests/raftcluster.py), through the agent's CSI socket as the kubelet calls it.

VAULT_ADDR is a standby's address (in production: a load balancer over the nodes). The standby forwards
creates and revocations to the active node; when the leader dies mid-burst, a call fails cleanly (nothing
mounted) or succeeds, and the kubelet's retry succeeds once a new leader is elected. Afterwards every live
pod's token works and no pod token outlives its pod, except those whose create lost its answer while the
leader died: each of those is counted (engine/intents.py), never silently left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from .conftest import source_cmd, token_file
from .csikubelet import new_pod
from .csinode import NODE_NAME, CsiNode

NGINX = {"vault/policies": "nginx"}
BACKOFF = (0.5, 1, 2, 4, 8, 8, 8)  # the kubelet's: 0.5 s doubling (capped here to keep the test short)


@pytest.fixture
def csi_node(cluster, tmp_path, log_dir):
    """An agent serving CSI, its Vault address one standby's."""
    auth = cluster.leader().generator_token(ttl="1h")
    (tmp_path / "generator").mkdir()
    generator = {"path": token_file(tmp_path / "generator", auth["client_token"])}
    standby = cluster.standbys()[0]
    node = CsiNode(source_cmd(), standby, generator, tmp_path, log_dir, VAULT_CLIENT_TIMEOUT="2s",
                   VAULT_MAX_RETRIES="1")
    node.standby = standby
    yield node.start()
    node.stop()


def publish_as_kubelet(node: CsiNode, pod, failures: list) -> Path:
    """NodePublishVolume with the kubelet's retry: every failure must leave nothing mounted."""
    for backoff in BACKOFF:
        try:
            return node.kubelet.publish(pod, NGINX, timeout=60)
        except grpc.RpcError as exc:
            target = node.kubelet.target_path(pod)
            assert not os.path.ismount(target), "a failed publish left a mount"
            failures.append((exc.code(), exc.details()))
            time.sleep(backoff)
    return node.kubelet.publish(pod, NGINX, timeout=60)


def pod_tokens(server, node_name: str = NODE_NAME) -> dict[str, dict]:
    """Every live token this node minted for a pod (meta.node), by accessor, as the root token sees them."""
    found = {}
    for accessor in server.accessors():
        token = server.lookup_accessor(accessor)
        if token and (token.get("meta") or {}).get("node") == node_name:
            found[accessor] = token
    return found


def unrecorded(node: CsiNode) -> int:
    from vaulttmpfs.engine import intents
    from vaulttmpfs.engine.state import StateStore

    return intents.summary(StateStore(node.env["VAULTTMPFS_STATE_DIR"]))["count"]


def test_the_leader_killed_during_a_100_pod_burst(cluster, csi_node):
    pods = [new_pod(f"burst-{n}") for n in range(100)]
    failures: list = []
    done = []
    old = cluster.leader()

    def kill_the_leader_mid_burst():
        while len(done) < 20:
            time.sleep(0.01)
        old.kill()

    killer = threading.Thread(target=kill_the_leader_mid_burst)
    killer.start()

    def one(pod) -> Path:
        path = publish_as_kubelet(csi_node, pod, failures)
        done.append(pod)
        return path

    with ThreadPoolExecutor(16) as pool:
        paths = list(pool.map(one, pods))
    killer.join()
    leader = cluster.wait_for_leader(not_=old)
    assert all(os.path.ismount(p) for p in paths)
    assert {code for code, _ in failures} <= {grpc.StatusCode.UNAVAILABLE}, failures

    # Every live pod's token works: its wrapping token unwraps to a token Vault accepts.
    for path in paths:
        wrapped = (path / "vault-token").read_text()
        token = leader.request("POST", "sys/wrapping/unwrap", {}, token=wrapped)["auth"]["client_token"]
        assert "nginx" in leader.request("GET", "auth/token/lookup-self", token=token)["data"]["policies"]

    for pod in pods:
        csi_node.kubelet.teardown(pod)
    # No recorded token outlives its pod; what is left is at most what the lost answers were counted as.
    left = pod_tokens(leader)
    try:
        assert len(left) <= unrecorded(csi_node), (len(left), unrecorded(csi_node), failures[:5])
    finally:
        for accessor in left:
            leader.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})


def test_a_sealed_node_fails_cleanly_and_the_retry_after_unseal_mounts(cluster, csi_node):
    standby = csi_node.standby
    standby.kill()
    standby._start(30)  # back on its data dir, sealed: it answers 503
    assert standby.health()["sealed"]
    pod = new_pod("sealed")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        csi_node.kubelet.publish(pod, NGINX, timeout=60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "sealed" in refused.value.details(), refused.value.details()
    assert time.monotonic() - started < 10
    assert unrecorded(csi_node) == 0  # a sealed Vault acts on nothing: no token may be alive
    standby.request("PUT", "sys/unseal", {"key": cluster.unseal_key}, token=None)
    cluster.wait_for_leader()
    path = publish_as_kubelet(csi_node, pod, [])
    assert os.path.ismount(path)
    minted = set(pod_tokens(cluster.leader()))
    assert len(minted) == 1, minted
    csi_node.kubelet.teardown(pod)
    # The unsealed standby forwards the create to the active node but answers a revoke-accessor from its
    # own copy of storage, which may not hold the create yet (it is catching up): "no token found" for a
    # live token. Seen as a plain user (2 runs in 3): the driver logged "token already gone" and the
    # token stayed alive. The driver asks the active node before it believes "gone".
    assert pod_tokens(cluster.leader()) == {}
    revoked = [e for e in events(csi_node) if e.get("event") in ("token revoked", "token already gone")
               and e.get("accessor") in minted]
    assert [e["event"] for e in revoked] == ["token revoked"], revoked
    assert not list(Path(csi_node.env["VAULTTMPFS_STATE_DIR"], "pending").glob("*"))  # nothing left queued


def events(node: CsiNode) -> list[dict]:
    return [json.loads(line) for line in node.log_file.read_text().splitlines() if line.startswith("{")]


def test_a_hung_node_is_bounded_and_nothing_is_left(cluster, csi_node):
    standby = csi_node.standby
    pod = new_pod("hung")
    os.kill(standby.proc.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            csi_node.kubelet.publish(pod, NGINX, timeout=60)
        took = time.monotonic() - started
    finally:
        os.kill(standby.proc.pid, signal.SIGCONT)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert took < 2 * (1 + 2) + 5, took  # VAULT_CLIENT_TIMEOUT x (VAULT_MAX_RETRIES + 2), and some slack
    assert not os.path.ismount(csi_node.kubelet.target_path(pod))
    cluster.wait_for_leader()
    path = publish_as_kubelet(csi_node, pod, [])
    assert os.path.ismount(path)
    csi_node.kubelet.teardown(pod)
    # The hung node never acted (it was stopped), yet nothing could tell: that create is counted.
    assert pod_tokens(cluster.leader()) == {}
    assert unrecorded(csi_node) <= 1




class StaleStandby:
    """A loopback proxy in front of a real standby that answers the first `stale` revoke-accessors (those
    not sent with X-Vault-Inconsistent) as a standby behind on Raft does: from storage that lacks the
    token (the sealed test's plain-user failure, made certain). `answer`: "warning" (200 "No token found
    with this accessor", with the standby's X-Vault-Index) or "error" (400 "token not found", no index:
    the accessor's entry applied, the token's not yet). Everything else goes to the standby as it came,
    and its answer back with its headers."""

    def __init__(self, upstream: str, answer: str, stale: int = 1):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.upstream, self.answer, self.stale = urlsplit(upstream), answer, stale
        self.index = ""
        self.revokes: list[dict] = []  # each revoke-accessor: whether it asked for the active node, how answered
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                revoke = self.path == "/v1/auth/token/revoke-accessor"
                forced = bool(self.headers.get("X-Vault-Inconsistent"))
                if revoke and not forced and proxy.stale > 0:
                    proxy.stale -= 1
                    proxy.revokes.append({"forced": False, "answer": proxy.answer})
                    if proxy.answer == "warning":
                        return self._send(200, {"X-Vault-Index": proxy.index}, json.dumps(
                            {"request_id": "stale-standby", "data": None,  # request_id: on every answer of OpenBao's
                             "warnings": ["No token found with this accessor"]}).encode())
                    return self._send(400, {}, b'{"errors":["token not found"]}')
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                try:
                    keep = {k: v for k, v in self.headers.items()
                            if k.lower() not in ("host", "connection", "content-length")}
                    conn.request(self.command, self.path, body=body or None, headers=keep)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                proxy.index = response.getheader("X-Vault-Index") or proxy.index
                if revoke:
                    proxy.revokes.append({"forced": forced, "answer": response.status})
                passed = {k: v for k, v in response.getheaders()
                          if k.lower() not in ("connection", "content-length", "transfer-encoding", "date", "server")}
                return self._send(response.status, passed, data)

            def _send(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _any  # noqa: N815 - http.server names them

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("answer", ["warning", "error"])
def test_a_standbys_stale_not_found_is_asked_of_the_active_node_and_the_token_revoked(cluster, tmp_path, log_dir,
                                                                                      answer):
    auth = cluster.leader().generator_token(ttl="1h")
    (tmp_path / "generator").mkdir()
    generator = {"path": token_file(tmp_path / "generator", auth["client_token"])}
    stale = StaleStandby(cluster.standbys()[0].addr, answer)
    node = CsiNode(source_cmd(), cluster.standbys()[0], generator, tmp_path, log_dir, VAULT_ADDR=stale.addr,
                   VAULT_CLIENT_TIMEOUT="2s", VAULT_MAX_RETRIES="1")
    node.start()
    try:
        pod = new_pod("stale")
        assert os.path.ismount(node.kubelet.publish(pod, NGINX, timeout=60))
        minted = set(pod_tokens(cluster.leader()))
        assert len(minted) == 1
        node.kubelet.teardown(pod)
        assert pod_tokens(cluster.leader()) == {}  # believed, the stale answer left the pod token alive
        assert stale.revokes[0] == {"forced": False, "answer": answer}
        assert stale.revokes[1]["forced"] and stale.revokes[1]["answer"] in (200, 204), stale.revokes
        revoked = [e["event"] for e in events(node) if e.get("accessor") in minted
                   and e.get("event") in ("token revoked", "token already gone")]
        assert revoked == ["token revoked"]
        assert not list(Path(node.env["VAULTTMPFS_STATE_DIR"], "pending").glob("*"))
    finally:
        node.stop()
        stale.close()
        for accessor in pod_tokens(cluster.leader()):
            cluster.leader().request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
