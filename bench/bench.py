#!/usr/bin/env python3
"""`make bench`: the built driver, called exactly as the kubelet calls it, against the physical floor.

Starts a throwaway OpenBao (tests/vaultserver.py; with --vault raft, a 3-node Raft cluster from
tests/raftcluster.py, the driver pointed at a standby), then, over --runs interleaved rounds (so
drift hits every column alike), times:

  floor       in this process: one raw HTTP token-create round trip (role, wrap header, a NEW TCP
              connection each time, as a fresh driver process has) + a bare tmpfs mount(2) at the
              pod's volume dir; for unmount, one revoke-accessor round trip (new connection) + umount2
  init        `<exe> init`
  mount       `<exe> mount <dir> <json>` and `<exe> unmount <dir>`, three ways:
  unmount       broker      `<exe> agent --broker` runs (the plain DaemonSet's default): the call mounts
                            itself and the agent makes its Vault calls (flexvolume/broker.py)
                standalone  no agent socket: the call does the work itself (imports hvac, ...)
                agent       `<exe> agent --relay` runs: the call hands the work to it (relay.py)
              and the CSI front end:
                csi         `<exe> agent --csi-endpoint unix://...` runs; NodePublishVolume and
                            NodeUnpublishVolume are sent over its socket as the kubelet sends them
                            (tests/csikubelet.py); wall = the RPC, CPU = the agent's during it

Calls are exec'd as the kubelet does: no shell, stdin /dev/null, stdout+stderr as one buffer that
must be one JSON object saying Success (anything else aborts the bench). Then a burst: --burst
concurrent mounts, then unmounts, per mode, against as many concurrent floor operations (threads).

Measures: wall (fork to reap), CPU = the child's user+sys from wait4(), peak RSS = GNU time's %M in a
separate pass (Linux charges the forking parent's peak RSS to a child's ru_maxrss, so a child of
this ~20 MiB Python process would never show less than that; `/usr/bin/time` is a ~1 MiB parent).
For the agent mode, the agent's own CPU per call (from /proc) and its resident size are reported too.
Everything is cleaned up: volumes unmounted, tokens revoked, agent and OpenBao stopped.

With --cluster-nodes N, none of the above: the cluster throughput mode of bench/cluster.py instead.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import math
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The csi mode holds gRPC channels while it forks agents with a preexec_fn: see tests/conftest.py.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

from tests.kubelet import Kubelet  # noqa: E402  -- the kubelet's layout and option keys
from tests.raftcluster import RaftCluster  # noqa: E402
from tests.vaultserver import VaultServer, dies_with_parent, free_port, stop_process  # noqa: E402

ROLE = "applications"
POD_OPTIONS = {"vault/policies": "nginx"}
WRAP_TTL = "5m"
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
GNU_TIME = "/usr/bin/time"
# The targets: issue 25's list, exactly (medians, same machine, same run).
INIT_REF_FACTOR = 1.5  # init p50 <= this x the bare interpreter's start (`python3 -S -c pass`)
BROKER_SLACK_MS = 5.0  # mount/unmount via the agent's broker p50 <= init + the floor's + this
BROKER_BURST_FACTOR = 2.0  # 50 brokered mounts <= this x (50 bare starts + the floor's burst)
CSI_SLACK_MS = 5.0  # CSI publish p50 <= floor + this
CSI_BURST_FACTOR = 3.0  # the CSI 50-burst <= this x the floor's burst
AGENT_RSS_MAX_MIB = 60.0  # the agent's resident size with the broker, CSI and metrics on
# Not targets: what merely starting a process costs, for reading the burst numbers.
REFERENCES = {"ref: /bin/true": ["/bin/true"], "ref: python3 -S -c pass": [sys.executable, "-S", "-E", "-c", "pass"]}

PYTHON_REF = "ref: python3 -S -c pass"

_libc = ctypes.CDLL(None, use_errno=True)


class BenchError(Exception):
    pass


@dataclass
class Sample:
    wall_ms: float
    cpu_ms: float
    rss_kib: int = 0


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)
    agent_cpu_ms: list[float] = field(default_factory=list)  # the agent's CPU during each relayed call

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def summary(self) -> dict:
        walls = [s.wall_ms for s in self.samples]
        cpus = [s.cpu_ms for s in self.samples]
        out = {"n": len(walls), "wall_p50_ms": p50(walls), "wall_p95_ms": p95(walls),
               "cpu_p50_ms": p50(cpus), "cpu_p95_ms": p95(cpus)}
        if self.agent_cpu_ms:
            out["agent_cpu_mean_ms"] = round(statistics.fmean(self.agent_cpu_ms), 2)
        return out


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)], 2)


# ---------------------------------------------------------------- the floor (in this process)

def tmpfs_mount(path: Path) -> None:
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc.mount(b"vaulttmpfs-floor", os.fsencode(path), b"tmpfs", flags, b"size=1m,mode=0700") != 0:
        err = ctypes.get_errno()
        raise BenchError(f"floor mount at {path}: {os.strerror(err)}")


def tmpfs_umount(path: Path) -> None:
    if _libc.umount2(os.fsencode(path), 0) != 0:
        err = ctypes.get_errno()
        raise BenchError(f"floor umount at {path}: {os.strerror(err)}")


class Floor:
    """What any driver must do at least: one Vault round trip and one mount syscall."""

    def __init__(self, addr: str, token: str):
        parts = urlsplit(addr)
        self.host, self.port = parts.hostname, parts.port
        self.token = token
        self.wrapping_accessors: list[str] = []
        self._lock = threading.Lock()

    def _post(self, path: str, body: dict, extra: dict | None = None) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)  # new connection, like a new process
        try:
            conn.request("POST", f"/v1/{path}", body=json.dumps(body),
                         headers={"X-Vault-Token": self.token, "Content-Type": "application/json", **(extra or {})})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status not in (200, 204):
            raise BenchError(f"floor POST {path}: HTTP {resp.status}: {data[:200]!r}")
        return json.loads(data) if data else {}

    def mount(self, path: Path) -> tuple[Sample, str]:
        started, cpu = time.perf_counter(), time.thread_time()
        reply = self._post(f"auth/token/create/{ROLE}",
                           {"policies": ["nginx"], "display_name": "vaulttmpfs-bench-floor",
                            "meta": {"created_by": "vaulttmpfs-bench"}},
                           {"X-Vault-Wrap-TTL": WRAP_TTL})
        wrap = reply["wrap_info"]
        tmpfs_mount(path)
        sample = Sample((time.perf_counter() - started) * 1000, (time.thread_time() - cpu) * 1000)
        with self._lock:
            self.wrapping_accessors.append(wrap["accessor"])
        return sample, wrap["wrapped_accessor"]

    def unmount(self, path: Path, accessor: str) -> Sample:
        started, cpu = time.perf_counter(), time.thread_time()
        self._post("auth/token/revoke-accessor", {"accessor": accessor})
        tmpfs_umount(path)
        return Sample((time.perf_counter() - started) * 1000, (time.thread_time() - cpu) * 1000)

    def revoke_wrapping_tokens(self, bao: VaultServer) -> None:
        """Cleanup, not timed: the wrapping tokens the floor never unwrapped."""
        for accessor in self.wrapping_accessors:
            with contextlib.suppress(Exception):
                bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})
        self.wrapping_accessors.clear()


# ---------------------------------------------------------------- the driver, exec'd like the kubelet

def exec_call(cmd: list[str], env: dict[str, str], rss_file: Path | None = None) -> tuple[Sample, dict]:
    """One call: fork to reap. With rss_file the call runs under GNU time for its peak RSS."""
    argv = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd] if rss_file else cmd
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)
    output = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = (time.perf_counter() - started) * 1000
    proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        reply = json.loads(output)  # the kubelet's CombinedOutput + json.Unmarshal
    except ValueError:
        raise BenchError(f"{shlex.join(cmd[-3:])}: output is not one JSON object: {output[:300]!r}") from None
    if not isinstance(reply, dict) or reply.get("status") != "Success" or proc.returncode != 0:
        raise BenchError(f"{shlex.join(cmd[-3:])}: exit {proc.returncode}: {output[:300]!r}")
    rss = int(rss_file.read_text().split()[-1]) if rss_file else usage.ru_maxrss
    return Sample(wall, (usage.ru_utime + usage.ru_stime) * 1000, rss), reply


def exec_only(cmd: list[str]) -> Sample:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Sample((time.perf_counter() - started) * 1000, (usage.ru_utime + usage.ru_stime) * 1000, usage.ru_maxrss)


class Agent:
    """`<exe> agent --relay` for the run; its CPU is read from /proc around each relayed call."""

    def __init__(self, cmd: list[str], env: dict[str, str], socket_path: str, serve: tuple[str, ...] = ("--relay",),
                 banner: bytes = b"vaulttmpfs-relay/"):
        self.socket_path = socket_path
        self.banner = banner
        # Metrics on, as a DaemonSet runs it (each agent on a port of its own).
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        env = {**env, "VAULTTMPFS_METRICS_ADDR": self.metrics_addr}
        # Its own stdout and stderr (a crash before logging says why there) go beside its log file.
        with open(env["VAULTTMPFS_LOG_FILE"] + ".out", "ab") as output:
            self.proc = subprocess.Popen([*cmd, "agent", *serve, "--health-addr", "", "--retry-interval", "1h"],
                                         env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=dies_with_parent())
        self.tick_ms = 1000 / os.sysconf("SC_CLK_TCK")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the agent exited {self.proc.returncode}; see its log")
            with contextlib.suppress(OSError):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(1)
                    sock.connect(self.socket_path)
                    if sock.recv(64).startswith(self.banner):
                        return
            time.sleep(0.1)
        raise BenchError("the agent's relay socket did not come up")

    def cpu_ms(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * self.tick_ms  # utime + stime

    def memory(self) -> dict:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {k: round(int(values[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM") if k in values}

    def stop(self) -> None:
        stop_process(self.proc, grace=60)


class Node:
    """The kubelet's side: pod dirs, the driver's environment, one call per verb."""

    def __init__(self, cmd: list[str], bao: VaultServer, work: Path, generator_path: Path):
        self.cmd = cmd
        root = work / "node"
        self.kubelet = Kubelet(cmd, {}, root)
        self.agent_socket = str(root / "run" / "agent.sock")
        self.broker_socket = str(root / "run" / "broker.sock")
        no_broker = str(root / "run" / "no-broker.sock")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "VAULT_ADDR": bao.addr,
            "VAULTTMPFS_GENERATOR_TOKEN_PATH": str(generator_path),
            "VAULTTMPFS_STATE_DIR": str(root / "state"),
            "VAULTTMPFS_LOG_FILE": str(work / "driver.log"),
            "VAULTTMPFS_PODS_DIR": str(self.kubelet.pods_dir),
        }
        if not is_frozen(cmd):
            self.env["PYTHONPATH"] = str(REPO)
        self.mode_env = {
            "agent": {**self.env, "VAULTTMPFS_AGENT_SOCKET": self.agent_socket, "VAULTTMPFS_BROKER_SOCKET": no_broker},
            "standalone": {**self.env, "VAULTTMPFS_AGENT_SOCKET": str(root / "run" / "no-agent.sock"),
                           "VAULTTMPFS_BROKER_SOCKET": no_broker},
            "broker": {**self.env, "VAULTTMPFS_AGENT_SOCKET": str(root / "run" / "no-agent.sock"),
                       "VAULTTMPFS_BROKER_SOCKET": self.broker_socket},
        }
        self.rss_file = work / "rss.txt"

    def new_volume(self) -> tuple[Path, str]:
        pod = self.kubelet.new_pod("bench")
        path = self.kubelet.volume_dir(pod)
        options = json.dumps(self.kubelet.options(pod, "token", POD_OPTIONS), separators=(",", ":"))
        return path, options

    def call(self, mode: str, *args: str, rss: bool = False) -> Sample:
        sample, _ = exec_call([*self.cmd, *args], self.mode_env[mode], self.rss_file if rss else None)
        return sample

    def mount(self, mode: str, path: Path, options: str, rss: bool = False) -> Sample:
        sample = self.call(mode, "mount", str(path), options, rss=rss)
        if not (path / "vault-token").is_file():
            raise BenchError(f"mount said Success but {path}/vault-token is missing")
        return sample

    def unmount(self, mode: str, path: Path, rss: bool = False) -> Sample:
        sample = self.call(mode, "unmount", str(path), rss=rss)
        if os.path.ismount(path):
            raise BenchError(f"unmount said Success but {path} is still mounted")
        path.rmdir()  # as the kubelet does after a successful unmount
        return sample


class CsiNode:
    """The CSI front end: its own agent (`--csi-endpoint`), called over gRPC as the kubelet calls it."""

    def __init__(self, cmd: list[str], env: dict[str, str], pods_dir: Path, work: Path):
        from tests.csikubelet import CsiKubelet

        socket_path = work / "csi" / "csi.sock"
        socket_path.parent.mkdir(mode=0o700)
        self.log_file = work / "csi-agent.log"
        # With the broker too, as variants/csi runs it: its RSS is the agent's with broker, CSI and metrics.
        env = {**env, "VAULTTMPFS_LOG_FILE": str(self.log_file),
               "VAULTTMPFS_BROKER_SOCKET": str(socket_path.parent / "broker.sock")}
        self.agent = Agent(cmd, env, str(socket_path), ("--csi-endpoint", f"unix://{socket_path}", "--broker"))
        self.kubelet = CsiKubelet(str(socket_path), pods_dir, "bench-node")

    def wait_ready(self) -> None:
        try:
            self.kubelet.wait_ready(timeout=60)
        except Exception as exc:
            log = [line for path in (self.log_file, Path(f"{self.log_file}.out")) if path.exists()
                   for line in path.read_text(errors="replace").splitlines()[-5:]]
            raise BenchError(f"the CSI agent did not come up (exit {self.agent.proc.poll()}); the end of its log:\n"
                             + "\n".join(log)) from exc

    def publish(self, timed_cpu: bool = True) -> tuple[Sample, object]:
        from tests.csikubelet import new_pod

        pod = new_pod("bench")
        request = self.kubelet.publish_request(pod, POD_OPTIONS)  # the kubelet's own work: not timed
        before = self.agent.cpu_ms() if timed_cpu else 0.0
        started = time.perf_counter()
        self.kubelet.node.NodePublishVolume(request, timeout=120)
        wall = (time.perf_counter() - started) * 1000
        cpu = self.agent.cpu_ms() - before if timed_cpu else 0.0
        if not (Path(request.target_path) / "vault-token").is_file():
            raise BenchError(f"NodePublishVolume said OK but {request.target_path}/vault-token is missing")
        return Sample(wall, cpu), pod

    def unpublish(self, pod, timed_cpu: bool = True) -> Sample:
        from tests.csikubelet import csi_pb2, volume_handle

        target = self.kubelet.target_path(pod)
        before = self.agent.cpu_ms() if timed_cpu else 0.0
        started = time.perf_counter()
        self.kubelet.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_handle(pod, "vault"), target_path=str(target)), timeout=120)
        wall = (time.perf_counter() - started) * 1000
        cpu = self.agent.cpu_ms() - before if timed_cpu else 0.0
        if target.exists():
            raise BenchError(f"NodeUnpublishVolume said OK but {target} is still there")
        (target.parent / "vol_data.json").unlink()  # then what the kubelet removes itself
        target.parent.rmdir()
        return Sample(wall, cpu)

    def stop(self) -> None:
        self.kubelet.close()
        self.agent.stop()


def is_frozen(cmd: list[str]) -> bool:
    return len(cmd) == 1 and not os.path.basename(cmd[0]).startswith("python")


# ---------------------------------------------------------------- the runs

class Bench:
    def __init__(self, args, bao: VaultServer, work: Path, generator: dict, generator_path: Path):
        self.args = args
        self.bao = bao
        self.node = Node(args.cmd, bao, work, generator_path)
        self.floor = Floor(bao.addr, generator["client_token"])
        self.modes = args.modes
        self.agent: Agent | None = None
        self.broker: Agent | None = None
        self.csi: CsiNode | None = None
        self.csi_memory: dict[str, dict] = {}
        self.series: dict[str, Series] = {}
        self.rss: dict[str, list[int]] = {}
        self.bursts: dict[str, dict[str, list[float]]] = {}
        self.work = work

    def s(self, name: str) -> Series:
        return self.series.setdefault(name, Series())

    def start_agent(self) -> None:
        env = {**self.node.mode_env["agent"], "VAULTTMPFS_LOG_FILE": str(self.work / "agent.log")}
        self.agent = Agent(self.args.cmd, env, self.node.agent_socket)
        self.agent.wait_ready()

    def start_broker(self) -> None:
        """`agent --broker` with metrics on, as the plain DaemonSet runs it."""
        env = {**self.node.mode_env["broker"], "VAULTTMPFS_LOG_FILE": str(self.work / "broker.log")}
        self.broker = Agent(self.args.cmd, env, self.node.broker_socket, serve=("--broker",),
                            banner=b"vaulttmpfs-broker/")
        self.broker.wait_ready()

    def start_csi(self) -> None:
        self.csi = CsiNode(self.args.cmd, self.node.env, self.node.kubelet.pods_dir, self.work)
        self.csi.wait_ready()

    def round(self, record: bool) -> None:
        self.floor_round(record)
        self.init_round(record)
        for mode in self.modes:
            self.mode_round(mode, record)

    def floor_round(self, record: bool) -> None:
        path, _options = self.node.new_volume()
        mounted, accessor = self.floor.mount(path)
        unmounted = self.floor.unmount(path, accessor)
        path.rmdir()
        if record:
            self.s("floor mount").add(mounted)
            self.s("floor unmount").add(unmounted)

    def init_round(self, record: bool) -> None:
        init = self.node.call("standalone", "init")
        start = exec_only(REFERENCES[PYTHON_REF])  # issue 25's ref for init, in the same round
        if record:
            self.s("init").add(init)
            self.s(PYTHON_REF).add(start)

    def mode_round(self, mode: str, record: bool) -> None:
        if mode == "csi":
            mounted, pod = self.csi.publish()
            unmounted = self.csi.unpublish(pod)
            if record:
                self.s("mount csi").add(mounted)
                self.s("unmount csi").add(unmounted)
                self.s("mount csi").agent_cpu_ms.append(mounted.cpu_ms)
                self.s("unmount csi").agent_cpu_ms.append(unmounted.cpu_ms)
            return
        path, options = self.node.new_volume()
        helper = {"agent": self.agent, "broker": self.broker}.get(mode)
        before = helper.cpu_ms() if helper else 0.0
        mounted = self.node.mount(mode, path, options)
        between = helper.cpu_ms() if helper else 0.0
        unmounted = self.node.unmount(mode, path)
        after = helper.cpu_ms() if helper else 0.0
        if record:
            self.s(f"mount {mode}").add(mounted)
            self.s(f"unmount {mode}").add(unmounted)
            if helper:
                self.s(f"mount {mode}").agent_cpu_ms.append(between - before)
                self.s(f"unmount {mode}").agent_cpu_ms.append(after - between)

    def blocks(self, rounds: int, warmup: int) -> None:
        """--no-interleave: every call of a kind back to back (what a warm process costs when nothing
        else ran in between), the floor's first."""
        for step in (self.floor_round, self.init_round, *(lambda r, m=m: self.mode_round(m, r) for m in self.modes)):
            for i in range(warmup + rounds):
                step(i >= warmup)

    def rss_pass(self, runs: int) -> None:
        if not os.access(GNU_TIME, os.X_OK):
            print(f"note: no {GNU_TIME}: peak RSS not measured", file=sys.stderr)
            return
        for _ in range(runs):
            self.rss.setdefault("init", []).append(self.node.call("standalone", "init", rss=True).rss_kib)
            for mode in (m for m in self.modes if m != "csi"):  # a CSI call is no process: see csi_memory
                path, options = self.node.new_volume()
                self.rss.setdefault(f"mount {mode}", []).append(self.node.mount(mode, path, options, rss=True).rss_kib)
                self.rss.setdefault(f"unmount {mode}", []).append(self.node.unmount(mode, path, rss=True).rss_kib)

    def burst(self, size: int) -> None:
        for who in ("floor", *self.modes):
            volumes = [self.node.new_volume() for _ in range(size)]
            if who == "csi":
                self._csi_burst(size)
                continue
            if who == "floor":
                mounted = concurrently([lambda v=v: self.floor.mount(v[0]) for v in volumes])
                accessors = [result[1] for result in mounted["results"]]
                unmounted = concurrently([lambda v=v, a=a: self.floor.unmount(v[0], a)
                                          for v, a in zip(volumes, accessors, strict=True)])
                for path, _ in volumes:
                    path.rmdir()
            else:
                mounted = concurrently([lambda v=v, m=who: self.node.mount(m, *v) for v in volumes])
                unmounted = concurrently([lambda v=v, m=who: self.node.unmount(m, v[0]) for v in volumes])
            self._record(who, mounted, unmounted)
        for name, cmd in REFERENCES.items():
            self._record(name, concurrently([lambda c=cmd: exec_only(c) for _ in range(size)]), None)

    def _csi_burst(self, size: int) -> None:
        """`size` pods at once: publishes, then unpublishes; the agent's CPU and memory around them."""
        memory = {"before": self.csi.agent.memory()}
        cpu = self.csi.agent.cpu_ms()
        mounted = concurrently([lambda: self.csi.publish(timed_cpu=False) for _ in range(size)])
        mounted["cpu_ms"], cpu = self.csi.agent.cpu_ms() - cpu, self.csi.agent.cpu_ms()
        memory["after_burst"] = self.csi.agent.memory()
        pods = [result[1] for result in mounted["results"]]
        unmounted = concurrently([lambda p=p: self.csi.unpublish(p, timed_cpu=False) for p in pods])
        unmounted["cpu_ms"] = self.csi.agent.cpu_ms() - cpu
        memory["after_unpublish"] = self.csi.agent.memory()
        self._record("csi", mounted, unmounted)
        for when, values in memory.items():
            self.csi_memory.setdefault(when, []).append(values["VmRSS"])

    def _record(self, who: str, mounted: dict, unmounted: dict | None) -> None:
        record = self.bursts.setdefault(who, {"mount_wall_ms": [], "unmount_wall_ms": [],
                                              "mount_cpu_ms": [], "unmount_cpu_ms": []})
        record["mount_wall_ms"].append(round(mounted["wall_ms"], 2))
        record["mount_cpu_ms"].append(round(mounted["cpu_ms"], 2))
        if unmounted:
            record["unmount_wall_ms"].append(round(unmounted["wall_ms"], 2))
            record["unmount_cpu_ms"].append(round(unmounted["cpu_ms"], 2))


def concurrently(tasks: list) -> dict:
    """Run every task at once (one thread each, released together); wall = first start to last end."""
    gate = threading.Barrier(len(tasks))
    results: list = [None] * len(tasks)
    errors: list[BaseException] = []
    spans: list[tuple[float, float]] = []

    def run(index: int) -> None:
        gate.wait()
        started = time.perf_counter()
        try:
            results[index] = tasks[index]()
        except BaseException as exc:  # noqa: BLE001 -- reported below, after every thread ended
            errors.append(exc)
        spans.append((started, time.perf_counter()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tasks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"{len(errors)} of {len(tasks)} concurrent calls failed; first: {errors[0]}")
    samples = [r[0] if isinstance(r, tuple) else r for r in results]
    return {"wall_ms": (max(e for _, e in spans) - min(s for s, _ in spans)) * 1000,
            "cpu_ms": sum(s.cpu_ms for s in samples), "results": results}


# ---------------------------------------------------------------- verdicts and output

def verdicts(summary: dict, bursts: dict, modes: list[str], csi_memory: dict | None = None,
             broker_memory: dict | None = None) -> list[dict]:
    """Issue 25's targets, those this run measured."""
    out = []
    if PYTHON_REF in summary:
        ref = summary[PYTHON_REF]["wall_p50_ms"]
        limit = INIT_REF_FACTOR * ref
        out.append(verdict("init p50 wall vs python3 -S", None, summary["init"]["wall_p50_ms"], limit,
                           f"<= {INIT_REF_FACTOR} x python3 -S {ref:.1f} = {limit:.1f} ms"))
    if "broker" in modes:  # a brokered call costs its start-up plus what it must do
        for verb in ("mount", "unmount"):
            limit = summary["init"]["wall_p50_ms"] + summary[f"floor {verb}"]["wall_p50_ms"] + BROKER_SLACK_MS
            out.append(verdict(f"{verb} p50 wall (broker)", "broker", summary[f"{verb} broker"]["wall_p50_ms"], limit,
                               f"<= init + floor {verb} + {BROKER_SLACK_MS:.0f} = {limit:.1f} ms"))
    if "broker" in modes and "floor" in bursts and PYTHON_REF in bursts:
        refs = (statistics.median(bursts[PYTHON_REF]["mount_wall_ms"])
                + statistics.median(bursts["floor"]["mount_wall_ms"]))
        out.append(verdict("burst mount wall (broker) vs refs", "broker",
                           round(statistics.median(bursts["broker"]["mount_wall_ms"]), 1), BROKER_BURST_FACTOR * refs,
                           f"<= {BROKER_BURST_FACTOR:.0f} x (python3 -S burst + floor burst) = "
                           f"{BROKER_BURST_FACTOR * refs:.1f} ms"))
    if "csi" in modes:
        floor_mount = summary["floor mount"]["wall_p50_ms"]
        limit = floor_mount + CSI_SLACK_MS
        out.append(verdict("publish p50 wall (csi)", "csi", summary["mount csi"]["wall_p50_ms"], limit,
                           f"<= floor {floor_mount:.1f} + {CSI_SLACK_MS:.0f} = {limit:.1f} ms"))
        if "floor" in bursts and "csi" in bursts:
            floor_burst = statistics.median(bursts["floor"]["mount_wall_ms"])
            wall = statistics.median(bursts["csi"]["mount_wall_ms"])
            out.append(verdict("burst publish wall (csi)", "csi", round(wall, 1), CSI_BURST_FACTOR * floor_burst,
                               f"<= {CSI_BURST_FACTOR:.0f} x floor {floor_burst:.1f} = "
                               f"{CSI_BURST_FACTOR * floor_burst:.1f} ms"))
    # The agent's RSS: the CSI mode's agent runs with the broker, CSI and metrics on (its peak after the
    # bursts); without the csi mode, the broker's agent (broker and metrics) at its high-water mark.
    if csi_memory and csi_memory.get("after_burst"):
        out.append(verdict("agent RSS (broker+csi+metrics)", "csi", max(csi_memory["after_burst"]), AGENT_RSS_MAX_MIB,
                           f"<= {AGENT_RSS_MAX_MIB:.0f} MiB (VmRSS after the bursts, max of "
                           f"{len(csi_memory['after_burst'])})"))
    elif broker_memory:
        out.append(verdict("agent RSS (broker+metrics)", "broker", broker_memory["VmHWM"], AGENT_RSS_MAX_MIB,
                           f"<= {AGENT_RSS_MAX_MIB:.0f} MiB (VmHWM)"))
    return out


def verdict(name: str, mode: str | None, value: float, limit: float, rule: str) -> dict:
    return {"target": name, "mode": mode, "value": value, "limit": round(limit, 2), "rule": rule,
            "result": "PASS" if value <= limit else "FAIL"}


def table(summary: dict, rss: dict, bursts: dict, checks: list[dict], burst_size: int) -> str:
    floor = {"mount": summary["floor mount"]["wall_p50_ms"], "unmount": summary["floor unmount"]["wall_p50_ms"]}
    lines = [f"{'call':<20}{'n':>4}{'wall p50':>10}{'wall p95':>10}{'cpu p50':>9}{'agent cpu':>10}"
             f"{'rss max':>9}{'p50/floor':>10}",
             "-" * 82]
    for name, row in summary.items():
        verb = name.split()[0] if not name.startswith("floor") else name.split()[1]
        ratio = f"{row['wall_p50_ms'] / floor[verb]:.1f}x" if verb in floor else "-"
        rss_max = f"{max(rss[name]) / 1024:.1f}M" if name in rss else "-"
        # A CSI call is no process of its own: its CPU is the agent's (mean, from /proc at 10 ms ticks).
        cpu = "-" if name.endswith(" csi") else f"{row['cpu_p50_ms']:.1f}"
        agent_cpu = f"{row['agent_cpu_mean_ms']:.1f}" if "agent_cpu_mean_ms" in row else "-"
        lines.append(f"{name:<20}{row['n']:>4}{row['wall_p50_ms']:>10.1f}{row['wall_p95_ms']:>10.1f}"
                     f"{cpu:>9}{agent_cpu:>10}{rss_max:>9}{ratio:>10}")
    if bursts:
        lines += ["", f"burst of {burst_size} concurrent calls (median of {len(bursts['floor']['mount_wall_ms'])}; "
                      "ref rows: processes that only start and exit):",
                  f"{'who':<26}{'mount wall':>12}{'unmount wall':>14}{'mount cpu sum':>15}{'vs floor':>10}"]
        floor_wall = statistics.median(bursts["floor"]["mount_wall_ms"])
        for who, rec in bursts.items():
            wall = statistics.median(rec["mount_wall_ms"])
            unmount = f"{statistics.median(rec['unmount_wall_ms']):.1f}" if rec["unmount_wall_ms"] else "-"
            lines.append(f"{who:<26}{wall:>12.1f}{unmount:>14}"
                         f"{statistics.median(rec['mount_cpu_ms']):>15.1f}{wall / floor_wall:>9.1f}x")
    lines += ["", "targets:"]
    lines += [f"  {c['result']}  {c['target']:<32} {c['value']:>8}  {c['rule']}" for c in checks]
    return "\n".join(lines)


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    return None


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exe", default=str(REPO / "dist" / "vaulttmpfs" / "vaulttmpfs"),
                        help="the driver command (a path, or e.g. 'python3 -m vaulttmpfs') [default: the build]")
    parser.add_argument("--runs", type=int, default=30, help="measured rounds [default: 30]")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first [default: 3]")
    parser.add_argument("--rss-runs", type=int, default=5, help="runs under GNU time per call [default: 5]")
    parser.add_argument("--burst", type=int, default=50, help="concurrent mounts per burst [default: 50]")
    parser.add_argument("--bursts", type=int, default=3, help="bursts per mode; the median counts [default: 3]")
    parser.add_argument("--modes", default="broker,agent,standalone,csi",
                        help="comma-separated: broker (the plain DaemonSet's: `agent --broker`), agent (the "
                             "deprecated relay: `agent --relay`), standalone, "
                             "csi (the CSI node plugin over gRPC) [default: all three]")
    parser.add_argument("--no-interleave", dest="interleave", action="store_false",
                        help="time each kind of call back to back instead of in interleaved rounds")
    parser.add_argument("--vault", choices=["dev", "raft"], default="dev",
                        help="dev: one `bao server -dev`; raft: a 3-node Raft cluster on loopback "
                             "(tests/raftcluster.py), the driver pointed at a standby, which forwards writes "
                             "to the active node [default: dev]")
    parser.add_argument("--cluster-nodes", type=int, default=0,
                        help="instead of the above: the cluster throughput mode (bench/cluster.py) with this many "
                             "simulated nodes, each its own CSI agent, state dir and generator token, against a raw "
                             "client making the same Vault calls at the same concurrency (the ceiling)")
    parser.add_argument("--cluster-concurrency", type=int, default=4, help="publishes at a time per node [4]")
    parser.add_argument("--cluster-pods", type=int, default=50, help="publish+unpublish cycles per node [50]")
    parser.add_argument("--cluster-audit", action="store_true",
                        help="with --vault raft: a file audit device on every node; prints what each node was asked "
                             "per path and operation, ours vs the raw client (the audit's own cost is in the figures)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results.json"), help="write results here")
    parser.add_argument("--fail-on-miss", action="store_true",
                        help="exit 1 when a target of the first mode misses (init, RSS, its mount and burst)")
    args = parser.parse_args(argv)
    if args.cluster_audit:
        os.environ["VAULTTMPFS_RAFT_AUDIT"] = "1"  # tests/raftcluster.py: read when each node's config is written
    args.cmd = shlex.split(args.exe)
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= {"broker", "agent", "standalone", "csi"} or not args.modes:
        parser.error("--modes takes broker, agent, standalone and/or csi")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench mounts real tmpfs: run as root (make bench does, or uses unshare)")
    if not shutil.which(args.cmd[0]) and not os.access(args.cmd[0], os.X_OK):
        raise SystemExit(f"no driver at {args.cmd[0]}: run `make build` (make bench does)")
    work = Path(tempfile.mkdtemp(prefix="vaulttmpfs-bench-"))
    bench = None
    try:
        with vault_server(args.vault) as bao:
            bao.setup_driver()
            generator = bao.generator_token(ttl="2h")
            generator_path = work / "vaulttoken"
            generator_path.write_text(generator["client_token"] + "\n")
            generator_path.chmod(0o600)
            bench = Bench(args, bao, work, generator, generator_path)
            if args.cluster_nodes:
                return cluster_mode(args, bao, bench, work)
            try:
                if "agent" in args.modes:
                    bench.start_agent()
                if "broker" in args.modes:
                    bench.start_broker()
                if "csi" in args.modes:
                    bench.start_csi()
                print(f"benchmarking {args.exe} ({args.warmup} warm-up + {args.runs} rounds, modes "
                      f"{', '.join(args.modes)}, {'interleaved' if args.interleave else 'back to back'}) "
                      f"against OpenBao at {bao.addr}", file=sys.stderr)
                if args.interleave:
                    for i in range(args.warmup + args.runs):
                        bench.round(record=i >= args.warmup)
                else:
                    bench.blocks(args.runs, args.warmup)
                bench.rss_pass(args.rss_runs)
                for _ in range(args.bursts):
                    bench.burst(args.burst)
                agent_memory = bench.agent.memory() if bench.agent else None
                broker_memory = bench.broker.memory() if bench.broker else None
            finally:
                if bench.agent:
                    bench.agent.stop()
                if bench.broker:
                    bench.broker.stop()
                if bench.csi:
                    bench.csi.stop()
                bench.floor.revoke_wrapping_tokens(bao)
                unmount_all(work)
                bao.revoke_token(generator["client_token"])
    finally:
        unmount_all(work)
        shutil.rmtree(work, ignore_errors=True)

    summary = {name: series.summary() for name, series in bench.series.items()}
    checks = verdicts(summary, bench.bursts, args.modes, bench.csi_memory, broker_memory)
    print(table(summary, bench.rss, bench.bursts, checks, args.burst))
    print(f"agent RSS (MiB): broker {broker_memory}, relay {agent_memory}")
    result = {
        "command": shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "driver": args.exe, "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "interleaved": args.interleave,
        "vault": args.vault,
        "floor_method": "in-process: http.client POST auth/token/create/<role> with X-Vault-Wrap-TTL over a new "
                        "TCP connection + mount(2) tmpfs; unmount: revoke-accessor (new connection) + umount2(2)",
        "rss_method": f"{GNU_TIME} -f %M (peak RSS of the call itself, KiB)",
        "summary": summary,
        "rss_kib": bench.rss,
        "agent_memory_mib": agent_memory,
        "broker_memory_mib": broker_memory,
        "csi_agent_rss_mib": bench.csi_memory,  # VmRSS per burst: before it, after the publishes, after unpublish
        "bursts": {"size": args.burst, **bench.bursts},
        "targets": checks,
        "samples": {name: [asdict(s) for s in series.samples] for name, series in bench.series.items()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    missed = [c for c in checks if c["result"] == "FAIL" and c["mode"] in (None, args.modes[0])]
    return 1 if args.fail_on_miss and missed else 0


def cluster_mode(args, bao: VaultServer, bench: Bench, work: Path) -> int:
    import cluster  # bench/cluster.py, beside this script (its dir is on sys.path)

    env = {k: v for k, v in bench.node.env.items() if k not in ("VAULTTMPFS_GENERATOR_TOKEN_PATH",)}
    result = cluster.run(args, bao, work, env, ROLE, WRAP_TTL, CsiNode)
    print(cluster.table(result))
    result.update(command=shlex.join([sys.argv[0], *sys.argv[1:]]), driver=args.exe, commit=git_commit(),
                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), vault=args.vault,
                  machine={"cpus": os.cpu_count(), "kernel": platform.release()})
    path = Path(args.json).with_name("cluster-results.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {path}")
    return 1 if args.fail_on_miss and any(c["result"] == "FAIL" for c in result["targets"]) else 0


@contextlib.contextmanager
def vault_server(kind: str):
    """The OpenBao the driver is pointed at: the dev server, or one standby of a Raft cluster."""
    if kind == "dev":
        with VaultServer() as bao:
            yield bao
    else:
        with RaftCluster() as cluster:
            yield cluster.standbys()[0]


def unmount_all(root: Path) -> None:
    """Whatever is still mounted under the bench's dir (a failed run) is detached."""
    prefix = os.path.realpath(root) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as table_file:
        targets = [line.split()[4] for line in table_file if line.split()[4].startswith(prefix)]
    for target in sorted(targets, key=len, reverse=True):
        _libc.umount2(os.fsencode(target), 2)  # MNT_DETACH


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"bench failed: {exc}")
