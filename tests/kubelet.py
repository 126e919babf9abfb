"""A kubelet stand-in: execs the driver exactly as pkg/volume/flexvolume does.

No shell, stdin /dev/null, stdout and stderr read as ONE buffer that must decode as exactly
one JSON object (the kubelet's CombinedOutput + json.Unmarshal), the kubelet's option keys,
and the kubelet's directory layout under a fake root.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

DRIVER = "cloudwatt~vaulttmpfs"


@dataclass
class Reply:
    status: str
    message: str
    body: dict
    exit_code: int
    seconds: float
    output: bytes

    @property
    def ok(self) -> bool:
        return self.status == "Success"


@dataclass
class Pod:
    uid: str
    name: str
    namespace: str = "default"
    service_account: str = "default"


class Kubelet:
    def __init__(self, driver_cmd: list[str], env: dict[str, str], root: Path):
        self.driver_cmd = driver_cmd
        self.env = env
        self.root = root
        self.pods_dir = root / "var/lib/kubelet/pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)

    def call(self, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> Reply:
        started = time.monotonic()
        proc = subprocess.run(
            [*self.driver_cmd, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=env if env is not None else self.env, timeout=timeout,
        )
        seconds = time.monotonic() - started
        try:
            body = json.loads(proc.stdout)
        except ValueError as exc:
            raise AssertionError(f"driver output is not one JSON object: {proc.stdout!r}") from exc
        assert isinstance(body, dict), f"driver output is not a JSON object: {proc.stdout!r}"
        assert body.get("status") in {"Success", "Failure", "Not supported"}, body
        return Reply(body["status"], body.get("message", ""), body, proc.returncode, seconds, proc.stdout)

    def call_cli(self, *args: str, input: str | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """An operator command (not a kubelet verb) with the node's environment."""
        return subprocess.run([*self.driver_cmd, *args], input=input, capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def init(self) -> Reply:
        return self.call("init")

    @staticmethod
    def new_pod(name: str = "web", namespace: str = "default", service_account: str = "default") -> Pod:
        return Pod(uid=str(uuid.uuid4()), name=name, namespace=namespace, service_account=service_account)

    def volume_dir(self, pod: Pod, volume: str = "token", create: bool = True) -> Path:
        path = self.pods_dir / pod.uid / "volumes" / DRIVER / volume
        if create:
            path.mkdir(mode=0o750, parents=True, exist_ok=True)
        return path

    @staticmethod
    def options(pod: Pod, volume: str, pod_options: dict[str, str], fs_group: int | None = None,
                read_only: bool = False) -> dict[str, str]:
        options = {
            "kubernetes.io/fsType": "tmpfs",
            "kubernetes.io/readwrite": "ro" if read_only else "rw",
            "kubernetes.io/pvOrVolumeName": volume,
            "kubernetes.io/pod.name": pod.name,
            "kubernetes.io/pod.namespace": pod.namespace,
            "kubernetes.io/pod.uid": pod.uid,
            "kubernetes.io/serviceAccount.name": pod.service_account,
        }
        if fs_group is not None:
            options["kubernetes.io/mounterArgs.FsGroup"] = str(fs_group)
        options.update(pod_options)  # the pod's own options are merged last
        return options

    def mount(self, pod: Pod, pod_options: dict[str, str], volume: str = "token", fs_group: int | None = None,
              read_only: bool = False, **kwargs) -> tuple[Reply, Path]:
        path = self.volume_dir(pod, volume)
        opts = json.dumps(self.options(pod, volume, pod_options, fs_group, read_only), separators=(",", ":"))
        return self.call("mount", str(path), opts, **kwargs), path

    def unmount(self, path: Path, **kwargs) -> Reply:
        return self.call("unmount", str(path), **kwargs)

    def teardown(self, path: Path, **kwargs) -> Reply:
        """What the kubelet does on pod deletion: unmount (skipped if the dir is gone), then rmdir."""
        if not path.exists():
            return Reply("Success", "skipped: dir gone", {}, 0, 0.0, b"")
        reply = self.unmount(path, **kwargs)
        if reply.ok:
            os.rmdir(path)
        return reply


def is_mount_point(path: Path) -> bool:
    return os.path.ismount(path)


def mount_entry(path: Path) -> dict | None:
    target = os.path.realpath(path)
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target:
            sep = fields.index("-")
            found = {"options": fields[5].split(","), "fstype": fields[sep + 1], "source": fields[sep + 2],
                     "super_options": fields[sep + 3].split(",")}
    return found
