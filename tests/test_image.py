"""`make image`: the installer image, built without a docker daemon, is reproducible and holds only
what the DaemonSet's commands need (the bundle, its glibc and libz, /bin/sh, /bin/sleep)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

import vaulttmpfs

from .vaultserver import REPO

BUNDLE = REPO / "dist" / "vaulttmpfs"


def make_image(out: Path) -> dict:
    out.mkdir()
    paths = {"IMAGE": out / "image.tar", "ROOTFS": out / "rootfs.tar", "IMAGE_CONTENTS": out / "contents.txt"}
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "image", *(f"{k}={v}" for k, v in paths.items())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return paths


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    return make_image(root / "a"), make_image(root / "b")


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_two_builds_give_the_same_bytes_and_digest(two_builds):
    a, b = two_builds
    assert a["IMAGE"].read_bytes() == b["IMAGE"].read_bytes()
    with tarfile.open(a["IMAGE"]) as tar:
        index = json.load(tar.extractfile("index.json"))
        docker = json.load(tar.extractfile("manifest.json"))
        # Every blob is named by its sha256, so the manifest digest names the whole image.
        for name in tar.getnames():
            if name.startswith("blobs/sha256/") and tar.getmember(name).isfile():
                assert hashlib.sha256(tar.extractfile(name).read()).hexdigest() == name.rsplit("/", 1)[1]
        manifest = json.load(tar.extractfile("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
        config = json.load(tar.extractfile(docker[0]["Config"]))
    version = vaulttmpfs.__version__
    assert docker[0]["RepoTags"] == [f"vaulttmpfs-installer:{version}"]
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == \
        f"docker.io/library/vaulttmpfs-installer:{version}"
    assert docker[0]["Layers"] == ["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    # The layer is the rootfs tar the Dockerfile ADDs: docker/podman users build the same files.
    assert manifest["layers"][0]["digest"] == "sha256:" + hashlib.sha256(a["ROOTFS"].read_bytes()).hexdigest()
    # Fixed mtimes (the last commit's), owners 0:0 without names.
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%ct"], capture_output=True, text=True, check=True).stdout)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members(a["ROOTFS"]).values()} == {(epoch, 0, 0, "", "")}
    # The config is the Dockerfile's (one source for both ways of building).
    dockerfile = (REPO / "installer" / "Dockerfile").read_text()
    assert re.search(r"^FROM scratch$", dockerfile, re.M) and "ADD build/image/rootfs.tar /" in dockerfile
    assert config["config"]["Entrypoint"] == ["/usr/local/bin/vaulttmpfs-entrypoint"]
    assert config["config"]["User"] == "0"
    assert "VAULTTMPFS_BUNDLE=/opt/vaulttmpfs" in config["config"]["Env"]


def test_the_image_holds_the_bundle_and_only_the_host_files_it_needs(two_builds):
    rootfs = members(two_builds[0]["ROOTFS"])
    files = {name for name, m in rootfs.items() if m.isfile()}
    bundle = {"opt/vaulttmpfs/" + str(p.relative_to(BUNDLE)) for p in BUNDLE.rglob("*") if p.is_file()}
    assert bundle <= files
    others = files - bundle
    listed = {}
    for line in two_builds[0]["IMAGE_CONTENTS"].read_text().splitlines():
        path, size, package = line.split("\t")
        listed[path.lstrip("/")] = package
    assert others == {"usr/local/bin/vaulttmpfs-entrypoint", *listed}
    # Debian's: dash for /bin/sh (entrypoint.sh), coreutils for sleep (no shipped manifest uses it now), and the
    # libraries of glibc and zlib (the PyInstaller bootloader links libz before the bundle's own).
    assert set(listed.values()) == {"dash", "coreutils", "libc6", "zlib1g"}
    assert {Path(p).name for p, pkg in listed.items() if pkg in ("dash", "coreutils")} == {"dash", "sleep"}
    assert rootfs["bin"].issym() and rootfs["usr/bin/sh"].linkname == "dash"
    # No Python, no package manager, no /etc: everything else is the bundle's.
    assert not any(n.startswith(("etc/", "var/", "usr/lib/python", "usr/bin/python")) for n in rootfs)
    modes = {name: m.mode for name, m in rootfs.items() if m.isfile()}
    assert all(mode & 0o022 == 0 for mode in modes.values())
    assert modes["opt/vaulttmpfs/vaulttmpfs"] == 0o755


def test_the_image_runs_the_daemonsets_commands(two_builds, tmp_path):
    """Unpacked, with only /dev added (a container runtime's part), the bundle runs from the image."""
    root = tmp_path / "rootfs"
    root.mkdir()
    with tarfile.open(two_builds[0]["ROOTFS"]) as tar:
        tar.extractall(root)  # our own archive; no filter= (Debian 12's python3 is 3.11.2, before it)
    (root / "dev").mkdir()
    (root / "plugins").mkdir()
    script = (f"mount --rbind /dev {root}/dev && exec chroot {root} /bin/sh -c "
              "'sleep 0 && VAULTTMPFS_PLUGIN_DIR=/plugins /opt/vaulttmpfs/vaulttmpfs install --source /opt/vaulttmpfs"
              " && /plugins/cloudwatt~vaulttmpfs/vaulttmpfs init'")
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer == {"status": "Success", "capabilities": {"attach": False, "fsGroup": False}}
    assert os.access(root / "plugins/cloudwatt~vaulttmpfs/vaulttmpfs", os.X_OK)


def test_the_bundle_needs_no_newer_glibc_than_the_readme_says():
    """The driver runs on the node with the node's glibc: the floor stated is the build's real one."""
    stated = re.search(r"needs \*\*glibc (\d+\.\d+)\*\*", (REPO / "installer" / "README.md").read_text())[1]
    needed = set()
    for path in [BUNDLE / "vaulttmpfs", *BUNDLE.rglob("*.so*")]:
        if path.is_file():
            symbols = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True).stdout
            needed |= {tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", symbols)}
    assert max(needed)[:2] == tuple(map(int, stated.split(".")))
