"""Last: nothing any case made is left, in OpenBao, in the mount table or in the process table."""

from __future__ import annotations

from pathlib import Path

from . import node as nodes


def test_nothing_is_left_when_the_run_ends(node):
    node.runtime.stop_all()
    assert node.crictl("pods", "-q") == ""
    # Only the kubelet root's own shared bind is left of every mount under it.
    leftover = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4].startswith(str(nodes.KUBELET_ROOT) + "/")]
    assert leftover == []
    # No token of any case alive: the generator revoked, only the dev server's root token remains.
    if node.bao.lookup_accessor(node.generator["accessor"]):  # the uninstall case revokes it itself
        node.bao.revoke_token(node.generator["client_token"])
    root = node.bao.request("GET", "auth/token/lookup-self")["data"]["accessor"]
    assert node.bao.accessors() == [root]
    node.containerd.stop()
    assert nodes.leftover_processes() == []
