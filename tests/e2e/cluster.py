"""What the e2e cases share: the DaemonSet deployed as an operator would, the app pod, the kubelet's
view of the installed driver, and small test images made by the installer image's recipe."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ..kubelet import Kubelet
from .cri import REPO, Pod, find, render

FS_GROUP = 2000
APP_IMAGE = "vaulttmpfs-e2e-app:1"


def small_image(work: Path, tag: str, entrypoint: str, files: list[str]) -> Path:
    """A test image made by the same recipe as the installer image (installer/mkimage.py)."""
    name = tag.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    dockerfile = work / f"{name}.Dockerfile"
    dockerfile.write_text(f"FROM scratch\nADD rootfs.tar /\nENTRYPOINT {entrypoint}\n")
    out = work / f"{name}.tar"
    subprocess.run([str(REPO / ".venv/bin/python"), str(REPO / "installer/mkimage.py"), "--dockerfile", str(dockerfile),
                    "--tag", tag, "--out", str(out), *files], check=True, capture_output=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
    return out


def deploy(node, kustomization: str | Path, check_init: bool = True, **settings: str) -> tuple[Pod, dict]:
    """`kubectl apply -k <kustomization>` on this node: the DaemonSet's pod, with the ConfigMap's settings
    (the operator's step 3: Vault's address, and any given here)."""
    docs = render(kustomization)
    configmap = find(docs, "ConfigMap")
    configmap["data"].update({"VAULT_ADDR": node.bao.addr, **settings})
    daemonset = find(docs, "DaemonSet")
    pod = node.runtime.run(Pod.from_daemonset(daemonset), {configmap["metadata"]["name"]: configmap},
                           check_init=check_init)
    return pod, daemonset


def app_pod(vault_addr: str, name: str, token_volume: dict) -> Pod:
    """A pod that reads its token the documented way: the volume (named vault), fsGroup, and
    `vaulttmpfs token` as non-root writing the unwrapped token to an emptyDir."""
    return Pod(name, "default", {
        "hostNetwork": True,  # no CNI here: OpenBao is on the node's loopback
        "securityContext": {"fsGroup": FS_GROUP, "runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
        "containers": [{
            "name": "token", "image": APP_IMAGE,
            "args": ["--volume", "/var/run/secrets/vaulttmpfs", "--out", "/var/run/vault"],
            "env": [{"name": "VAULT_ADDR", "value": vault_addr}],
            "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumeMounts": [{"name": "vault", "mountPath": "/var/run/secrets/vaulttmpfs", "readOnly": True},
                             {"name": "out", "mountPath": "/var/run/vault"}],
        }],
        "volumes": [{"name": "vault", **token_volume}, {"name": "out", "emptyDir": {"medium": "Memory"}}],
    })


def installed_driver(daemonset: dict) -> Path:
    """Where the kubelet finds the driver: its plugin dir (the DaemonSet's plugin-dir hostPath) + vendor~driver."""
    [volume] = [v for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == "plugin-dir"]
    return Path(volume["hostPath"]["path"]) / "cloudwatt~vaulttmpfs" / "vaulttmpfs"


def kubelet_for(driver: Path) -> Kubelet:
    # The kubelet's environment: nothing of ours (the driver reads the config file install wrote).
    return Kubelet([str(driver)], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, Path("/"))
