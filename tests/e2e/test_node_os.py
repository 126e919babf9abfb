"""The driver as installed runs on the oldest node OS the README claims (installer/README.md, Image):
a minimal chroot of that Debian release (mmdebstrap --variant=minbase, `make e2e` makes it), with
only what Debian's required packages bring (glibc, zlib), does init, mount and unmount."""

from __future__ import annotations

import json
import os
import subprocess

from vaulttmpfs.engine.state import StateStore

from ..kubelet import Kubelet
from .cri import REPO

DRIVER = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec/cloudwatt~vaulttmpfs/vaulttmpfs"


def test_installed_driver_mounts_and_unmounts_on_the_oldest_node_os(node, tmp_path):
    root = tmp_path / "node-os"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", os.environ["VAULTTMPFS_E2E_NODE_OS"]], check=True)
    release = (root / "etc/os-release").read_text()
    subprocess.run(["cp", "-a", str(REPO / "dist/vaulttmpfs"), str(root / "opt/vaulttmpfs")], check=True)
    for fs, where in (("--rbind", "dev"), ("proc", "proc")):
        args = ["mount", "--rbind", "/dev"] if fs == "--rbind" else ["mount", "-t", "proc", "proc"]
        subprocess.run([*args, str(root / where)], check=True)
    generator = node.bao.generator_token(ttl="10m")
    (root / "etc/vaulttmpfs").mkdir()
    (root / "etc/vaulttmpfs/vaulttoken").write_text(generator["client_token"] + "\n")
    (root / "etc/vaulttmpfs/vaulttoken").chmod(0o600)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VAULT_ADDR": node.bao.addr}

    def chroot(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, env=env, timeout=120)

    try:
        installed = chroot("/opt/vaulttmpfs/vaulttmpfs", "install", "--source", "/opt/vaulttmpfs")
        assert installed.returncode == 0, f"{release}\n{installed.stdout}{installed.stderr}"
        init = chroot(DRIVER, "init")
        assert json.loads(init.stdout + init.stderr)["status"] == "Success", init.stdout + init.stderr
        pod = Kubelet.new_pod("node-os")
        mount_dir = f"/var/lib/kubelet/pods/{pod.uid}/volumes/cloudwatt~vaulttmpfs/vault"
        (root / mount_dir.lstrip("/")).mkdir(mode=0o750, parents=True)
        options = Kubelet.options(pod, "vault", {"vault/policies": "nginx"}, fs_group=2000)
        mounted = chroot(DRIVER, "mount", mount_dir, json.dumps(options, separators=(",", ":")))
        assert json.loads(mounted.stdout + mounted.stderr)["status"] == "Success", mounted.stdout + mounted.stderr
        assert os.path.ismount(root / mount_dir.lstrip("/"))
        # The record is keyed by the dir as the driver saw it (inside the chroot).
        accessor = StateStore(str(root / "var/lib/vaulttmpfs")).read_volume(mount_dir).accessor
        assert node.bao.lookup_accessor(accessor)
        unmounted = chroot(DRIVER, "unmount", mount_dir)
        assert json.loads(unmounted.stdout + unmounted.stderr)["status"] == "Success", unmounted.stdout
        assert not os.path.ismount(root / mount_dir.lstrip("/"))
    finally:
        subprocess.run(["umount", "-R", "-l", str(root / "dev")], check=False)
        subprocess.run(["umount", "-R", "-l", str(root / "proc")], check=False)
        node.bao.revoke_token(generator["client_token"])
    # The pod's token, minted and revoked by the driver on that OS: none left alive.
    assert node.bao.lookup_accessor(accessor) is None
