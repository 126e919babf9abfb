"""Our kubelet's pod side: a rendered manifest's pod spec turned into the CRI calls the kubelet makes
(through the real crictl), and its probes. One translation for every pod the e2e runs (the
DaemonSet's, as `kubectl kustomize` renders it, and the app pods).

Followed from the kubelet's source (kubernetes/kubernetes pkg/kubelet/kuberuntime/):
- kuberuntime_sandbox.go generatePodSandboxConfig: metadata, hostname, log dir, port mappings,
  linux.cgroup_parent, the sandbox security context (namespaces, supplemental groups with fsGroup,
  privileged when any container is);
- util.go namespacesForPod: network NODE for hostNetwork else POD, pid CONTAINER, ipc POD;
- kuberuntime_container.go generateContainerConfig + kuberuntime_container_linux.go: command/args,
  envs, mounts, resources (MilliCPUToShares, memory limit), security_context.go
  determineEffectiveSecurityContext (container over pod context, no_new_privs from
  allowPrivilegeEscalation, masked/readonly /proc paths unless privileged);
- kubelet_pods.go makeMounts / makeEnvironmentVariables: volume host paths, mountPropagation,
  $(VAR) expansion and fieldRef values;
- kuberuntime_manager.go SyncPod: sandbox, then each init container to completion, then containers;
- pkg/probe/http/http.go: an httpGet probe succeeds on 200-399.
Left out, as no test here depends on them: service-link env vars, /etc/hosts and termination-log
mounts, DNS config (hostNetwork pods here), restarts on failure (a failed step fails the test).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .. import manifests
from .node import Crictl

REPO = Path(__file__).resolve().parents[2]
KUBELET_PODS = Path("/var/lib/kubelet/pods")
NODE_NAME = "e2e-node"
NODE_IP = "127.0.0.1"  # the run's network namespace has only its loopback

# pkg/securitycontext/util.go: the /proc and /sys paths masked or read-only in unprivileged containers.
MASKED = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
PROPAGATION = {None: 0, "None": 0, "HostToContainer": 1, "Bidirectional": 2}  # CRI MountPropagation
SECCOMP = {"RuntimeDefault": 0, "Unconfined": 1}  # CRI SecurityProfile.ProfileType


def render(kustomization: str | Path) -> list[dict]:
    """`kubectl kustomize` of a dir (relative: under installer/k8s): the objects a user applies."""
    return manifests.render(REPO / "installer" / "k8s" / kustomization)


def find(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def quantity(value: str | None) -> int:
    """A Kubernetes quantity (128Mi, 10m) as an integer: bytes, or millis for a trailing m."""
    if value is None:
        return 0
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if str(value).endswith(suffix):
            return int(float(str(value)[: -len(suffix)]) * factor)
    if str(value).endswith("m"):
        return int(str(value)[:-1])
    return int(float(value) * 1000) if "." in str(value) else int(value)


@dataclass
class Pod:
    """A pod as the kubelet gets it from the API server: metadata + spec, with a uid."""

    name: str
    namespace: str
    spec: dict
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    sandbox: str = ""
    containers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_daemonset(cls, daemonset: dict, node: str = NODE_NAME) -> "Pod":
        template = daemonset["spec"]["template"]
        name = f"{daemonset['metadata']['name']}-{uuid.uuid4().hex[:5]}"
        return cls(name, daemonset["metadata"]["namespace"], json.loads(json.dumps(template["spec"])),
                   dict(template["metadata"].get("labels", {})), dict(template["metadata"].get("annotations", {})))

    @property
    def dir(self) -> Path:
        return KUBELET_PODS / self.uid

    def volume_path(self, volume: dict) -> Path:
        """Where the kubelet has the volume on the host (kubelet_pods.go makeMounts, volume plugins' GetPath)."""
        if "hostPath" in volume:
            return Path(volume["hostPath"]["path"])
        if "configMap" in volume:
            return self.dir / "volumes/kubernetes.io~configmap" / volume["name"]
        if "emptyDir" in volume:
            return self.dir / "volumes/kubernetes.io~empty-dir" / volume["name"]
        if "flexVolume" in volume:
            return self.dir / "volumes" / volume["flexVolume"]["driver"].replace("/", "~") / volume["name"]
        if "csi" in volume:
            return self.dir / "volumes/kubernetes.io~csi" / volume["name"] / "mount"
        raise AssertionError(f"volume kind not played here: {volume}")

    def prepare_volumes(self, configmaps: dict[str, dict]) -> None:
        """The host side of the volumes the kubelet itself provides (host_path.go, configmap.go, empty_dir.go)."""
        for volume in self.spec.get("volumes", []):
            path = self.volume_path(volume)
            if "hostPath" in volume:
                kind = volume["hostPath"].get("type", "")
                if kind == "DirectoryOrCreate":
                    path.mkdir(mode=0o755, parents=True, exist_ok=True)
                elif kind == "Directory":
                    assert path.is_dir(), f"hostPath {path} (type Directory) does not exist"
            elif "configMap" in volume:
                path.mkdir(parents=True)
                for key, value in configmaps[volume["configMap"]["name"]]["data"].items():
                    (path / key).write_text(value)
            elif "emptyDir" in volume:
                path.mkdir(mode=0o777, parents=True)
                path.chmod(0o777)

    def security(self, container: dict | None) -> dict:
        pod_sc = self.spec.get("securityContext") or {}
        sc = {**pod_sc, **((container or {}).get("securityContext") or {})}
        privileged = bool(sc.get("privileged")) if container else any(
            (c.get("securityContext") or {}).get("privileged") for c in self.all_containers())
        out: dict = {
            "namespace_options": {"network": 2 if self.spec.get("hostNetwork") else 0,
                                  "pid": 2 if self.spec.get("hostPID") else 1,
                                  "ipc": 2 if self.spec.get("hostIPC") else 0},
            "privileged": privileged,
            "supplemental_groups": ([pod_sc["fsGroup"]] if "fsGroup" in pod_sc else [])
            + list(pod_sc.get("supplementalGroups", [])),
            "seccomp": {"profile_type": SECCOMP[(sc.get("seccompProfile") or {}).get("type", "Unconfined")]},
        }
        for key, cri in (("runAsUser", "run_as_user"), ("runAsGroup", "run_as_group")):
            if key in sc:
                out[cri] = {"value": sc[key]}
        if container is not None:
            out["readonly_rootfs"] = bool(sc.get("readOnlyRootFilesystem"))
            out["no_new_privs"] = sc.get("allowPrivilegeEscalation") is False
            caps = sc.get("capabilities") or {}
            out["capabilities"] = {"add_capabilities": caps.get("add", []), "drop_capabilities": caps.get("drop", [])}
            if not privileged:
                out["masked_paths"], out["readonly_paths"] = MASKED, READONLY
        return out

    def all_containers(self) -> list[dict]:
        return self.spec.get("initContainers", []) + self.spec["containers"]

    def sandbox_config(self, attempt: int = 0) -> dict:
        ports = [{"protocol": 0, "container_port": p["containerPort"], "host_port": p.get("hostPort", 0),
                  "host_ip": p.get("hostIP", "")} for c in self.spec["containers"] for p in c.get("ports", [])]
        return {
            "metadata": {"name": self.name, "uid": self.uid, "namespace": self.namespace, "attempt": attempt},
            # The node's own for hostNetwork pods (no UTS namespace of their own): not set.
            "hostname": "" if self.spec.get("hostNetwork") else self.name,
            "log_directory": f"/var/log/pods/{self.namespace}_{self.name}_{self.uid}",
            "port_mappings": ports,
            "labels": {**self.labels, "io.kubernetes.pod.name": self.name,
                       "io.kubernetes.pod.namespace": self.namespace, "io.kubernetes.pod.uid": self.uid},
            "annotations": self.annotations,
            "linux": {"cgroup_parent": f"/vaulttmpfs-e2e/pod{self.uid}", "security_context": self.security(None)},
        }

    def env(self, container: dict) -> list[dict]:
        values: dict[str, str] = {}
        field_values = {"status.podIP": NODE_IP if self.spec.get("hostNetwork") else "", "spec.nodeName": NODE_NAME,
                        "metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                        "status.hostIP": NODE_IP}
        for item in container.get("env", []):
            if "valueFrom" in item:
                values[item["name"]] = field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
            else:  # third_party/forked/golang/expansion: $(NAME) of an earlier variable, $$ for $
                values[item["name"]] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                              lambda m: "$" if m[0] == "$$" else values.get(m[1], m[0]),
                                              item.get("value", ""))
        return [{"key": k, "value": v} for k, v in values.items()]

    def container_config(self, container: dict, attempt: int = 0) -> dict:
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        mounts = [{"container_path": m["mountPath"], "host_path": str(self.volume_path(volumes[m["name"]])),
                   "readonly": bool(m.get("readOnly")), "propagation": PROPAGATION[m.get("mountPropagation")],
                   "selinux_relabel": False} for m in container.get("volumeMounts", [])]
        resources = container.get("resources") or {}
        shares = max(2, quantity((resources.get("requests") or {}).get("cpu")) * 1024 // 1000)
        return {
            "metadata": {"name": container["name"], "attempt": attempt},
            "image": {"image": container["image"]},
            "command": container.get("command", []),
            "args": container.get("args", []),
            "working_dir": container.get("workingDir", ""),
            "envs": self.env(container),
            "mounts": mounts,
            "labels": {"io.kubernetes.container.name": container["name"], "io.kubernetes.pod.uid": self.uid},
            "log_path": f"{container['name']}/{attempt}.log",
            "linux": {"resources": {"cpu_shares": shares,
                                    "memory_limit_in_bytes": quantity((resources.get("limits") or {}).get("memory"))},
                      "security_context": self.security(container)},
        }


class PodRuntime:
    """SyncPod and KillPod, through crictl."""

    def __init__(self, crictl: Crictl, work: Path):
        self.crictl = crictl
        self.work = work / "cri"
        self.work.mkdir(exist_ok=True)
        self.running: list[Pod] = []

    def _json(self, name: str, obj: dict) -> str:
        path = self.work / f"{name}-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(obj))
        return str(path)

    def run(self, pod: Pod, configmaps: dict[str, dict] | None = None, before_containers=None,
            wait_init: float = 120, check_init: bool = True) -> Pod:
        """SyncPod. With check_init=False a failed init container ends it there (pod.failed_init = its
        logs), where the kubelet would restart it with backoff (Init:CrashLoopBackOff)."""
        pod.dir.mkdir(parents=True, exist_ok=True)
        pod.prepare_volumes(configmaps or {})
        if before_containers:
            before_containers(pod)  # the kubelet mounts the pod's plugin volumes before its containers start
        sandbox_json = self._json("sandbox", pod.sandbox_config())
        pod.sandbox = self.crictl("runp", sandbox_json)
        self.running.append(pod)
        for container in pod.spec.get("initContainers", []):
            cid = self.start(pod, container, sandbox_json)
            state = self.wait_exit(cid, wait_init)
            if state["exitCode"] != 0 and not check_init:
                pod.failed_init = self.logs(cid)  # type: ignore[attr-defined]
                return pod
            assert state["exitCode"] == 0, f"init container {container['name']} failed: {self.logs(cid)}"
        for container in pod.spec["containers"]:
            self.start(pod, container, sandbox_json)
        return pod

    def start(self, pod: Pod, container: dict, sandbox_json: str, attempt: int = 0) -> str:
        config = self._json(container["name"], pod.container_config(container, attempt))
        cid = self.crictl("create", pod.sandbox, config, sandbox_json)
        self.crictl("start", cid)
        pod.containers[container["name"]] = cid
        pod.sandbox_json = sandbox_json  # type: ignore[attr-defined]
        return cid

    def restart(self, pod: Pod, name: str) -> str:
        """A container that died is started again (attempt + 1), as the kubelet does for restartPolicy Always."""
        [container] = [c for c in pod.spec["containers"] if c["name"] == name]
        old = pod.containers[name]
        attempt = self.inspect(old)["status"]["metadata"]["attempt"] + 1
        self.crictl("rm", "-f", old)
        return self.start(pod, container, pod.sandbox_json, attempt)  # type: ignore[attr-defined]

    def inspect(self, cid: str) -> dict:
        return self.crictl.json("inspect", cid)

    def state(self, cid: str) -> dict:
        return self.inspect(cid)["status"]

    def wait_exit(self, cid: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.state(cid)
            if status["state"] == "CONTAINER_EXITED":
                return status
            time.sleep(0.2)
        raise AssertionError(f"container {cid} still running after {timeout}s: {self.logs(cid)}")

    def logs(self, cid: str) -> str:
        proc = subprocess.run([*self.crictl.base, "logs", cid], capture_output=True, text=True)
        return proc.stdout + proc.stderr

    def pid(self, cid: str) -> int:
        pid = self.inspect(cid)["info"]["pid"]
        assert pid > 0, f"container {cid} has no process: {self.logs(cid)}"  # kill(0) would hit the run itself
        return pid

    def stop(self, pod: Pod) -> None:
        """KillPod: stop the containers (terminationGracePeriodSeconds), then the sandbox, then remove it."""
        grace = str(pod.spec.get("terminationGracePeriodSeconds", 30))
        for cid in pod.containers.values():
            self.crictl("stop", "--timeout", grace, cid, check=False)
        self.crictl("stopp", pod.sandbox)
        self.crictl("rmp", "--force", pod.sandbox)
        if pod in self.running:
            self.running.remove(pod)

    def stop_all(self) -> None:
        for pod in list(self.running):
            self.stop(pod)


def probe(pod: Pod, container_name: str, kind: str, timeout: float = 0) -> int:
    """The container's httpGet probe (readinessProbe/livenessProbe), once or until it succeeds: the HTTP status."""
    [container] = [c for c in pod.all_containers() if c["name"] == container_name]
    spec = container[kind]["httpGet"]
    port = spec["port"]
    if isinstance(port, str):  # a named port
        [port] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    url = f"http://{spec.get('host', NODE_IP)}:{port}{spec.get('path', '/')}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=container[kind].get("timeoutSeconds", 1)) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = 0
        if 200 <= status < 400 or time.monotonic() >= deadline:
            return status
        time.sleep(0.2)
