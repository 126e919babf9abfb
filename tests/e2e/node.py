"""The node the e2e run plays on: its own mount, pid and network namespaces (made by `make e2e`),
the kubelet's and vaulttmpfs' host paths at their real places, and a real containerd + runc.

Nothing here outlives the run: the overlays, tmpfs mounts and bind mounts live in the run's mount
namespace, and containerd, its shims and every container process in its pid namespace, so they
all go when the run's first process ends, even on kill -9 (`unshare --kill-child`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

# Host paths the manifests and the driver name (hostPath volumes, defaults such as /var/log/vaulttmpfs.log,
# the kubelet's /var/log/pods). Their parents are
# overlaid so that they can be made without writing to the machine's own /etc, /usr, /var or /run.
OVERLAID = ("/etc", "/usr/libexec", "/var/lib", "/var/log", "/run")
KUBELET_ROOT = Path("/var/lib/kubelet")


def check_isolated() -> None:
    """Refuse to mount over /etc and /var/lib anywhere but in the namespaces `make e2e` makes."""
    if os.environ.get("VAULTTMPFS_E2E_NAMESPACES") != "1" or os.getpid() != 1:
        raise SystemExit("tests/e2e mounts over /etc, /var/lib and /run: run it with `make e2e`, which makes "
                         "it its own mount, pid and network namespaces")


def prepare_host(work: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # the new network namespace's loopback
    for top in OVERLAID:
        name = top.strip("/").replace("/", "-")
        upper, scratch = work / "overlay" / name / "upper", work / "overlay" / name / "work"
        upper.mkdir(parents=True)
        scratch.mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={top},upperdir={upper},workdir={scratch}", top], check=True)
    # The kubelet's root as a real node's systemd leaves it: a shared mount, so Bidirectional
    # propagation (the CSI plugin's pods dir) reaches the host (container-runtime-notes.md).
    (KUBELET_ROOT / "pods").mkdir(parents=True)
    (KUBELET_ROOT / "plugins_registry").mkdir()
    (KUBELET_ROOT / "plugins").mkdir()
    subprocess.run(["mount", "--bind", str(KUBELET_ROOT), str(KUBELET_ROOT)], check=True)
    subprocess.run(["mount", "--make-rshared", str(KUBELET_ROOT)], check=True)


def sidecar(name: str, into: Path) -> str:
    """A real Kubernetes node binary from SIDECARS_DIR (xz-compressed as in ../shared/bin, or plain)."""
    where = Path(os.environ.get("SIDECARS_DIR", ""))
    into.mkdir(exist_ok=True)
    target = into / name
    if (where / name).is_file():
        shutil.copy(where / name, target)
    elif (where / f"{name}.xz").is_file():
        with open(target, "wb") as out:
            subprocess.run(["xz", "-dc", str(where / f"{name}.xz")], stdout=out, check=True)
    else:
        raise SystemExit(f"no {name} or {name}.xz in SIDECARS_DIR={where} (make e2e SIDECARS_DIR=<dir with the "
                         "official crictl, csi-node-driver-registrar and livenessprobe>)")
    target.chmod(0o755)
    return str(target)


class Containerd:
    """Debian's containerd with its own root, state and socket; runc; cgroupfs; no CNI (host network)."""

    def __init__(self, work: Path, sandbox_image: str):
        self.dir = work / "containerd"
        self.dir.mkdir()
        self.socket = self.dir / "containerd.sock"
        self.config = self.dir / "config.toml"
        self.config.write_text(f"""version = 2
root = "{self.dir}/root"
state = "{self.dir}/state"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.dir}/ttrpc.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  # Nothing can be pulled here: the sandbox ("pause") image is one we build and import.
  sandbox_image = "{sandbox_image}"
  # This machine's root may not lower an OOM score, which runc otherwise does for every sandbox
  # (container-runtime-notes.md): with this, containerd keeps scores at or above its own.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{self.dir}/cni"
    bin_dir = "{self.dir}/cni-bin"
""")
        self.log = open(self.dir / "containerd.log", "wb")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "Containerd":
        binary = shutil.which("containerd") or "/usr/bin/containerd"
        self.proc = subprocess.Popen([binary, "--config", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: {(self.dir / 'containerd.log').read_text()[-3000:]}")
            time.sleep(0.1)
        return self

    def ctr(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, check=True, **kwargs)

    def import_image(self, archive: Path) -> str:
        out = self.ctr("images", "import", str(archive)).stdout
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Crictl:
    """The real crictl against our containerd: the CRI calls the kubelet makes."""

    def __init__(self, binary: str, socket: Path):
        # Its config next to it (crictl's second place to look): never the machine's /etc/crictl.yaml.
        config = Path(binary).with_name("crictl.yaml")
        config.write_text(f"runtime-endpoint: unix://{socket}\nimage-endpoint: unix://{socket}\ntimeout: 60\n")
        self.base = [binary, "--config", str(config)]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"crictl {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout.strip()

    def json(self, command: str, *args: str) -> dict:
        return json.loads(self(command, "-o", "json", *args))


def reap() -> None:
    """As the run's pid 1, collect the orphans that exited (shims, reparented to us)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def leftover_processes(names: tuple[str, ...] = ("containerd", "containerd-shim", "containerd-shim-runc-v2", "runc"),
                       wait: float = 10) -> list[str]:
    """Processes of ours still running in the run's pid namespace (it is all ours), after `wait` seconds."""
    deadline = time.monotonic() + wait
    while (found := _running(names)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _running(names: tuple[str, ...]) -> list[str]:
    reap()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in names:
                found.append(f"{entry.name} {comm}")
    return found


def remove_cgroups(relative: str = "vaulttmpfs-e2e") -> None:
    """The pod cgroups our kubelet's cgroup_parent named (the kubelet's cgroupfs pod manager removes
    them too): empty dirs, deepest first, in every hierarchy."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / relative
        if not top.is_dir():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                path.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
        except OSError:
            pass
