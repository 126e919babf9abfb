"""The e2e node: real containerd + runc through CRI (the real crictl), the installer image as
`make image` builds it, a real OpenBao, our kubelet part. Run by `make e2e` only (not collected by
`make test`: pyproject's norecursedirs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..vaultserver import REPO, VaultServer
from . import node as nodes
from .cluster import APP_IMAGE as APP
from .cluster import small_image
from .cri import PodRuntime

PAUSE = "vaulttmpfs-e2e-pause:1"


@dataclass
class Node:
    work: Path
    bao: VaultServer
    containerd: nodes.Containerd
    crictl: nodes.Crictl
    runtime: PodRuntime
    generator: dict
    installer_image: Path
    sidecars: Path


@pytest.fixture(scope="session")
def node(tmp_path_factory):
    nodes.check_isolated()
    image = Path(os.environ.get("VAULTTMPFS_E2E_IMAGE", ""))
    if not image.is_file():
        raise SystemExit(f"no installer image at VAULTTMPFS_E2E_IMAGE={image}: run `make e2e` (it runs `make image`)")
    work = tmp_path_factory.mktemp("node")
    nodes.remove_cgroups()  # a run killed -9 leaves its empty pod cgroups: nothing else survives it
    nodes.prepare_host(work)
    crictl = nodes.sidecar("crictl", work / "bin")
    bundle = str(REPO / "dist/vaulttmpfs")
    # The sandbox image: a process that waits for the pod's end. The app: our pod-side companion,
    # `vaulttmpfs token`, which unwraps the volume's token (what a pod's init container runs).
    pause = small_image(work, PAUSE, '["/bin/sleep", "infinity"]', ["--host", "/bin/sleep"])
    app = small_image(work, APP, '["/opt/vaulttmpfs/vaulttmpfs", "token"]',
                      ["--tree", f"/opt/vaulttmpfs={bundle}", "--libs-from", f"{bundle}/.vaulttmpfs-lib"])
    containerd = nodes.Containerd(work, f"docker.io/library/{PAUSE}").start()
    bao = VaultServer().start()
    runtime = None
    try:
        for archive in (image, pause, app):
            containerd.import_image(archive)
        bao.setup_driver()
        generator = bao.generator_token(ttl="2h")
        # The operator's step 5 (installer/README.md): the node's generator token, root's, 0600.
        token_dir = Path("/etc/vaulttmpfs")
        token_dir.mkdir(mode=0o755, exist_ok=True)
        path = token_dir / "vaulttoken"
        path.write_text(generator["client_token"] + "\n")
        path.chmod(0o600)
        runtime = PodRuntime(nodes.Crictl(crictl, containerd.socket), work)
        yield Node(work, bao, containerd, runtime.crictl, runtime, generator, image,
                   Path(os.environ.get("SIDECARS_DIR", "")))
    finally:
        if runtime:
            runtime.stop_all()
        containerd.stop()
        bao.stop()
        nodes.remove_cgroups()
