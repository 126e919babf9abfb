"""`make bench BENCH_ARGS="--cluster-nodes 3"`: throughput against the Vault, not the node.

Several simulated nodes, each with its own agent serving CSI (`<exe> agent --csi-endpoint`), its own
state dir, pods dir, log and generator token, drive publish+unpublish cycles over their sockets as the
kubelet sends them, --cluster-concurrency at a time per node, --cluster-pods cycles per node. Reported:
pods/s (cycles completed per second of wall time), p50/p99 publish and unpublish latency, and Vault
requests per pod lifecycle, counted by the servers (`vault_core_handle_request_count` in OpenBao's
`sys/metrics`, before and after; on a Raft cluster on the active node, where every write lands (see
servers()); what the scrapes themselves add is measured and subtracted).

In the same run a raw client makes the same Vault calls, on kept-alive connections as the agent does:
create a wrapped token against the role, revoke the pod token, revoke the wrapping token (a "not
found" from a Raft standby asked again of the active node, as the driver does). It runs twice:

- the ceiling, with as many Vault calls in flight as ours may have: nodes x min(concurrency, write
  budget). Each agent never has more than its budget of writes in flight (VAULTTMPFS_VAULT_WRITE_BUDGET,
  default 4), and every call here is a write; a ceiling with more in flight measures the budget, not
  the driver. The >= 80% target is judged on this one: the driver's own cost at the same Vault load.
- unbounded, at nodes x concurrency in flight (what the issue's "same concurrency" reads as when the
  budget is ignored): shown for what the budget costs; run with the budget = the concurrency to compare.

Two more raw runs, to tell what Vault's CPU and time per pod depend on (docs/vault-cluster.md): "paced",
the ceiling held to ours' pods/s; "loaded", the ceiling with the CPU ours' node side used (agents and
kubelet stand-in, measured) burnt beside it on the same CPUs. The raw create sends the driver's body
(hvac's explicit defaults and the pod's metadata, as the audit shows). --cluster-audit adds a file
audit device on every node and prints what each was asked, per path, operation, headers and body keys.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

CEILING_SHARE = 0.8
CALLS_PER_POD = 3  # create (wrapped) + revoke the pod token + revoke the wrapping token: see --help


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 2)


def servers(bao) -> list:
    """Where the requests are counted: the dev server, or a Raft cluster's active node. Every write
    reaches the active node; a standby counts a request it forwards as well (it runs it first, as a
    read, and forwards on the first storage write), so summing the nodes counts each write twice
    (measured: 6.01 per pod for the raw client's 3 calls). Reads a standby answers itself are not
    counted here: the cycle makes none (the generator check and the role read are hourly)."""
    cluster = getattr(bao, "cluster", None)
    return [cluster.leader()] if cluster else [bao]


def handled(bao, line_start: str = "vault_core_handle_request_count ") -> float:
    """The count of requests handled (OpenBao's own metric) where they are counted (servers()); with
    line_start="vault_core_handle_request_sum ", the ms they took there (Vault's own time per request)."""
    total = 0.0
    for server in servers(bao):
        conn = http.client.HTTPConnection(urlsplit(server.addr).hostname, urlsplit(server.addr).port, timeout=30)
        try:
            conn.request("GET", "/v1/sys/metrics?format=prometheus", headers={"X-Vault-Token": server.root_token})
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        if response.status != 200 or "vault_" not in text:
            raise RuntimeError(f"{server.addr} sys/metrics: HTTP {response.status}, no metrics "
                               "(is telemetry's prometheus_retention_time set?)")
        # A node that has handled nothing yet (a standby) has no such line.
        total += sum(float(line.split()[1]) for line in text.splitlines()
                     if line.startswith(line_start))
    return total


def cpu_ms(pid: int) -> float:
    """A process's CPU time so far (utime + stime), ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def own_cpu_ms() -> float:
    """This process's CPU time (every thread): the kubelet stand-in's gRPC for ours, the raw client's HTTP."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1000


def vault_pids(bao) -> list[int]:
    cluster = getattr(bao, "cluster", None)
    return [n.proc.pid for n in (cluster.nodes if cluster else [bao]) if n.proc and n.proc.poll() is None]


AUDITED_HEADERS = ("x-vault-index", "x-vault-inconsistent", "x-vault-forward", "x-vault-wrap-ttl")


def audit_start(bao) -> dict | None:
    """With --cluster-audit (tests/raftcluster.py's audit device on every node): the headers the audit shows
    unhashed, and where each node's log ends now (what follows is the phase to count)."""
    cluster = getattr(bao, "cluster", None)
    if not cluster or not os.environ.get("VAULTTMPFS_RAFT_AUDIT"):
        return None
    leader = cluster.leader()
    for header in AUDITED_HEADERS:
        leader.request("POST", f"sys/config/auditing/request-headers/{header}", {"hmac": False})
    return {node.name: os.path.getsize(node.log_path) for node in cluster.nodes}


def audit_count(bao, marks: dict | None) -> dict | None:
    """Per node (active or standby): request entries per "operation path [headers] {body keys}", and the
    client connections (remote ports) they came on, since audit_start()."""
    if marks is None:
        return None
    cluster = bao.cluster
    active = cluster.leader().name
    counted = {}
    for node in cluster.nodes:
        with open(node.log_path, "rb") as log:
            log.seek(marks[node.name])
            lines = log.read().splitlines()
        requests: dict[str, int] = {}
        ports: set = set()
        errors: dict[str, int] = {}
        for line in lines:
            if not line.startswith(b"{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            req = entry.get("request") or {}
            path = req.get("path", "")
            key = f"{req.get('operation')} {path}"
            if entry.get("type") == "request":
                headers = sorted(h for h in (req.get("headers") or {}))
                body = sorted((req.get("data") or {}).keys())
                key += (f" [{','.join(headers)}]" if headers else "") + (f" {{{','.join(body)}}}" if body else "")
                if req.get("wrap_ttl"):
                    key += f" wrap_ttl={req['wrap_ttl']}"
                requests[key] = requests.get(key, 0) + 1
                ports.add((req.get("remote_address"), req.get("remote_port")))
            elif entry.get("error"):
                err = f"{key}: {' '.join(entry['error'].split())[:100]}"  # the standby's own try, then forwarded
                errors[err] = errors.get(err, 0) + 1
        counted[f"{node.name} ({'active' if node.name == active else 'standby'})"] = {
            "requests": dict(sorted(requests.items())), "connections": len(ports), "errors": errors}
    return counted


def scrape_cost(bao) -> float:
    """What one handled() adds to the count itself (the scrapes a node counts), measured."""
    first = handled(bao)
    return handled(bao) - first


SUM = "vault_core_handle_request_sum "


def ms_per_request(bao, count_before: float, ms_before: float) -> float:
    """Vault's own time per request handled since then, where they are counted (the active node: the
    forwarded writes, from their arrival there to the answer; waits for a client's budget are not in it)."""
    count = handled(bao) - count_before
    return round((handled(bao, SUM) - ms_before) / count, 1) if count else 0.0


def requests_per_pod(bao, before: float, pods: int, cost: float) -> float:
    return round((handled(bao) - before - cost) / pods, 2)


class SimulatedNode:
    def __init__(self, index: int, args, bao, work: Path, env_base: dict[str, str], csi_node):
        root = work / f"cluster-node{index}"
        (root / "state").mkdir(parents=True)
        self.generator = bao.generator_token(ttl="2h")
        token_path = root / "vaulttoken"
        token_path.write_text(self.generator["client_token"] + "\n")
        token_path.chmod(0o600)
        pods = root / "pods"
        env = {**env_base, "VAULTTMPFS_GENERATOR_TOKEN_PATH": str(token_path),
               "VAULTTMPFS_STATE_DIR": str(root / "state"), "VAULTTMPFS_PODS_DIR": str(pods),
               "VAULTTMPFS_NODE_NAME": f"bench-cluster-node{index}",
               "VAULTTMPFS_AGENT_SOCKET": str(root / "no-agent.sock")}
        if os.environ.get("VAULTTMPFS_VAULT_WRITE_BUDGET"):  # the budget under test, from the bench's environment
            env["VAULTTMPFS_VAULT_WRITE_BUDGET"] = os.environ["VAULTTMPFS_VAULT_WRITE_BUDGET"]
        self.csi = csi_node(args.cmd, env, pods, root)  # bench.CsiNode: an agent and a kubelet stand-in

    def metrics(self) -> str:
        conn = http.client.HTTPConnection(*self.csi.agent.metrics_addr.split(":"), timeout=30)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def seconds(self) -> dict[str, float]:
        """Seconds spent so far, from the agent's histograms: in volume calls (mount, unmount: the agent's
        side of publish and unpublish) and in Vault calls by kind (waits for the write budget included)."""
        spent: dict[str, float] = {}
        for line in self.metrics().splitlines():
            name, _, number = line.rpartition(" ")
            for metric, key in (("vaulttmpfs_volume_operation_duration_seconds_sum{", "verb"),
                                ("vaulttmpfs_vault_request_duration_seconds_sum{", "call")):
                if name.startswith(metric):
                    label = name.split(f'{key}="', 1)[1].split('"', 1)[0]
                    spent[label] = spent.get(label, 0.0) + float(number)
        return spent

    def budget(self) -> dict:
        """The agent's write budget as its /metrics tells: size, peak in flight, waits, refusals."""
        text = self.metrics()
        wanted = {"vaulttmpfs_vault_write_budget": "size", "vaulttmpfs_vault_writes_in_flight_peak": "peak",
                  "vaulttmpfs_vault_write_budget_waits_total": "waits",
                  "vaulttmpfs_vault_write_budget_refusals_total": "refusals"}
        found = {}
        for line in text.splitlines():
            name, _, number = line.partition(" ")
            if name in wanted:
                found[wanted[name]] = float(number)
        return found

    def cycle(self, publish_ms: list, unpublish_ms: list) -> None:
        sample, pod = self.csi.publish(timed_cpu=False)
        publish_ms.append(sample.wall_ms)
        unpublish_ms.append(self.csi.unpublish(pod, timed_cpu=False).wall_ms)


def drive(nodes: list[SimulatedNode], per_node: int, concurrency: int) -> dict:
    publish_ms: list[float] = []
    unpublish_ms: list[float] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(len(nodes) * concurrency) as pool:
        jobs = [pool.submit(node.cycle, publish_ms, unpublish_ms) for _ in range(per_node) for node in nodes]
        for job in jobs:
            job.result()
    seconds = time.perf_counter() - started
    pods = len(nodes) * per_node
    return {"pods": pods, "seconds": round(seconds, 2), "pods_per_s": round(pods / seconds, 1),
            "publish_p50_ms": percentile(publish_ms, 0.5), "publish_p99_ms": percentile(publish_ms, 0.99),
            "unpublish_p50_ms": percentile(unpublish_ms, 0.5), "unpublish_p99_ms": percentile(unpublish_ms, 0.99)}


class RawClient:
    """The ceiling: the same Vault calls per pod, nothing else, one kept-alive connection per thread."""

    def __init__(self, bao, token: str, role: str, wrap_ttl: str):
        self.host, self.port = urlsplit(bao.addr).hostname, urlsplit(bao.addr).port
        self.token, self.role, self.wrap_ttl = token, role, wrap_ttl
        self.local = threading.local()
        self.asked_active = 0  # "not found" answers asked again of the active node

    def _post(self, path: str, body: dict, extra: dict | None = None, gone_ok: bool = False) -> dict:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.request("POST", f"/v1/{path}", body=json.dumps(body),
                     headers={"X-Vault-Token": self.token, "Content-Type": "application/json", **(extra or {})})
        response = conn.getresponse()
        data = response.read()
        self.local.index = response.getheader("X-Vault-Index")
        # A standby answers a revoke-accessor from its own storage (vault/client.py revoke_accessor):
        # 200 "No token found" or 400 "token not found" while it has not applied the create yet.
        if gone_ok and (b"token not found" in data.lower() or b"no token found" in data.lower()):
            return {"gone": True}
        if response.status not in (200, 204):
            raise RuntimeError(f"raw POST {path}: HTTP {response.status}: {data[:200]!r}")
        return json.loads(data) if data else {}

    def _revoke(self, accessor: str) -> None:
        if self._post("auth/token/revoke-accessor", {"accessor": accessor}, gone_ok=True).get("gone"):
            from vaulttmpfs.vault.client import _beyond  # the driver's own index arithmetic

            self.asked_active += 1
            if not self.local.index:  # an error (400 "token not found") carries none; a read's answer does
                conn = self.local.conn
                conn.request("GET", "/v1/auth/token/lookup-self", headers={"X-Vault-Token": self.token})
                response = conn.getresponse()
                response.read()
                self.local.index = response.getheader("X-Vault-Index")
            again = self._post("auth/token/revoke-accessor", {"accessor": accessor}, gone_ok=True, extra={
                "X-Vault-Index": _beyond(self.local.index or ""), "X-Vault-Inconsistent": "forward-active-node"})
            if again.get("gone"):
                raise RuntimeError(f"raw revoke-accessor: the active node has no token for accessor {accessor}")

    def body(self) -> dict:
        """What the driver's create sends (the audit shows its keys): hvac's explicit defaults and the pod's
        metadata (engine/operation.py token_metadata), the values of a bench pod's size."""
        self.made = getattr(self, "made", 0) + 1
        pod = f"bench-raw-{self.made}"
        return {"policies": ["nginx"], "no_parent": False, "no_default_policy": False, "renewable": True,
                "display_name": f"vaulttmpfs-default-{pod}", "num_uses": 0,
                "meta": {"created_by": "vaulttmpfs", "namespace": "default", "pod": pod,
                         "pod_uid": "0f3c9a8e-1b2c-4d5e-8f90-123456789abc", "service_account": "default",
                         "volume": "vault-token", "node": "bench-cluster-node0"}}

    def cycle(self, publish_ms: list, unpublish_ms: list) -> None:
        started = time.perf_counter()
        wrap = self._post(f"auth/token/create/{self.role}", self.body(),
                          {"X-Vault-Wrap-TTL": self.wrap_ttl})["wrap_info"]
        publish_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        self._revoke(wrap["wrapped_accessor"])
        self._revoke(wrap["accessor"])
        unpublish_ms.append((time.perf_counter() - started) * 1000)


def run(args, bao, work: Path, env_base: dict[str, str], role: str, wrap_ttl: str, csi_node) -> dict:
    """Both runs, ours then the ceiling's, and the verdicts; every node stopped and token revoked after."""
    nodes = [SimulatedNode(i, args, bao, work, env_base, csi_node) for i in range(args.cluster_nodes)]
    try:
        for node in nodes:
            node.csi.wait_ready()
        drive(nodes, 2, 1)  # warm-up: connections, the generator check and the role read, per node
        cost = scrape_cost(bao)
        marks = audit_start(bao)
        before, spent_ms = handled(bao), handled(bao, SUM)
        cpu = ([n.csi.agent.cpu_ms() for n in nodes], [cpu_ms(p) for p in vault_pids(bao)], own_cpu_ms())
        spent = [node.seconds() for node in nodes]
        ours = drive(nodes, args.cluster_pods, args.cluster_concurrency)
        ours["audit"] = audit_count(bao, marks)
        ours["agent_ms_per_pod"] = {}  # where a pod's time in the agents went, summed over the nodes
        for node, earlier in zip(nodes, spent, strict=True):
            for what, total in node.seconds().items():
                ms = (total - earlier.get(what, 0.0)) * 1000 / ours["pods"]
                ours["agent_ms_per_pod"][what] = round(ours["agent_ms_per_pod"].get(what, 0.0) + ms, 1)
        ours["client_cpu_ms_per_pod"] = round((own_cpu_ms() - cpu[2]) / ours["pods"], 1)
        ours["agent_cpu_ms_per_pod"] = round((sum(n.csi.agent.cpu_ms() for n in nodes) - sum(cpu[0])) / ours["pods"], 1)
        ours["vault_cpu_ms_per_pod"] = round((sum(map(cpu_ms, vault_pids(bao))) - sum(cpu[1])) / ours["pods"], 1)
        ours["vault_ms_per_request"] = ms_per_request(bao, before, spent_ms)
        ours["vault_requests_per_pod"] = requests_per_pod(bao, before, ours["pods"], cost)
        ours["write_budget_per_node"] = [node.budget() for node in nodes]
        budget = int(min(b.get("size", 4) for b in ours["write_budget_per_node"]))
        in_flight = len(nodes) * min(args.cluster_concurrency, budget)
        raw = RawClient(bao, nodes[0].generator["client_token"], role, wrap_ttl)
        marks = audit_start(bao)
        before, spent_ms = handled(bao), handled(bao, SUM)
        cpu = ([], [cpu_ms(p) for p in vault_pids(bao)], own_cpu_ms())
        ceiling = _drive_raw(raw, len(nodes) * args.cluster_pods, in_flight)
        ceiling["vault_ms_per_request"] = ms_per_request(bao, before, spent_ms)
        ceiling["audit"] = audit_count(bao, marks)
        ceiling["client_cpu_ms_per_pod"] = round((own_cpu_ms() - cpu[2]) / ceiling["pods"], 1)
        ceiling["vault_cpu_ms_per_pod"] = round((sum(map(cpu_ms, vault_pids(bao))) - sum(cpu[1])) / ceiling["pods"], 1)
        ceiling["vault_requests_per_pod"] = requests_per_pod(bao, before, ceiling["pods"], cost)
        ceiling["in_flight"] = in_flight
        before = handled(bao)
        unbounded = _drive_raw(raw, len(nodes) * args.cluster_pods, len(nodes) * args.cluster_concurrency)
        unbounded["vault_requests_per_pod"] = requests_per_pod(bao, before, unbounded["pods"], cost)
        unbounded["in_flight"] = len(nodes) * args.cluster_concurrency
        # The raw client held to ours' pods/s: Vault's CPU per pod at the same rate (it is not a constant
        # per request: part of it goes with the time the cluster is busy, so a slower run shows more per pod).
        cpu = [cpu_ms(p) for p in vault_pids(bao)]
        before, spent_ms = handled(bao), handled(bao, SUM)
        paced = _drive_raw(raw, len(nodes) * args.cluster_pods, in_flight, rate=ours["pods_per_s"])
        paced["vault_ms_per_request"] = ms_per_request(bao, before, spent_ms)
        paced["vault_cpu_ms_per_pod"] = round((sum(map(cpu_ms, vault_pids(bao))) - sum(cpu)) / paced["pods"], 1)
        paced["in_flight"] = in_flight
        # The ceiling again, with the CPU ours' node side (agents + kubelet stand-in) took from this box
        # burnt beside it: what the ceiling is when Vault gets only the CPU it got in ours' run.
        share = (ours["agent_cpu_ms_per_pod"] + ours["client_cpu_ms_per_pod"]) * ours["pods_per_s"] / 1000
        cpu = [cpu_ms(p) for p in vault_pids(bao)]
        before, spent_ms = handled(bao), handled(bao, SUM)
        with burning(share):
            loaded = _drive_raw(raw, len(nodes) * args.cluster_pods, in_flight)
        loaded["vault_cpu_ms_per_pod"] = round((sum(map(cpu_ms, vault_pids(bao))) - sum(cpu)) / loaded["pods"], 1)
        loaded["vault_ms_per_request"] = ms_per_request(bao, before, spent_ms)
        loaded["burnt_cpus"] = round(share, 2)
        ceiling["asked_active"] = raw.asked_active  # the raw runs'
        ours["in_flight"] = in_flight
    finally:
        for node in nodes:
            node.csi.stop()
            bao.revoke_token(node.generator["client_token"])
    share = ours["pods_per_s"] / ceiling["pods_per_s"]
    checks = [
        {"name": "cluster pods/s vs the raw client's at the same Vault calls in flight", "value": round(share, 2),
         "limit": CEILING_SHARE, "result": "PASS" if share >= CEILING_SHARE else "FAIL",
         "rule": f">= {CEILING_SHARE:.0%} of the ceiling"},
        {"name": "Vault requests per pod lifecycle", "value": ours["vault_requests_per_pod"],
         "limit": CALLS_PER_POD + 0.1,
         "result": "PASS" if ours["vault_requests_per_pod"] <= CALLS_PER_POD + 0.1 else "FAIL",
         "rule": f"<= {CALLS_PER_POD} (create + 2 revocations; the pod's own unwrap is not the node's)"},
    ]
    return {"nodes": args.cluster_nodes, "concurrency_per_node": args.cluster_concurrency,
            "pods_per_node": args.cluster_pods, "write_budget": budget, "ours": ours, "ceiling": ceiling,
            "unbounded": unbounded, "paced": paced, "loaded": loaded,
            "unbounded_share": round(ours["pods_per_s"] / unbounded["pods_per_s"], 2),
            "targets": checks}


@contextlib.contextmanager
def burning(cpus: float):
    """Processes that burn `cpus` CPUs (each busy for its share of every 10 ms, asleep for the rest)."""
    from tests.vaultserver import dies_with_parent  # bench.py put the repo on sys.path

    procs = []
    left = cpus
    while left > 0.01:
        duty = min(left, 1.0)
        left -= duty
        procs.append(subprocess.Popen([sys.executable, "-c", (
            "import time\nwhile True:\n t = time.perf_counter() + %f\n while time.perf_counter() < t: pass\n"
            " time.sleep(%f)\n") % (0.01 * duty, 0.01 * (1 - duty))], preexec_fn=dies_with_parent()))
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _drive_raw(raw: RawClient, pods: int, concurrency: int, rate: float | None = None) -> dict:
    """`pods` cycles, `concurrency` at a time; with `rate`, the i-th starts no earlier than i/rate s in."""
    publish_ms: list[float] = []
    unpublish_ms: list[float] = []
    started = time.perf_counter()

    def paced(i: int) -> None:
        if rate:
            time.sleep(max(0.0, started + i / rate - time.perf_counter()))
        raw.cycle(publish_ms, unpublish_ms)

    with ThreadPoolExecutor(concurrency) as pool:
        for job in [pool.submit(paced, i) for i in range(pods)]:
            job.result()
    seconds = time.perf_counter() - started
    return {"pods": pods, "seconds": round(seconds, 2), "pods_per_s": round(pods / seconds, 1),
            "publish_p50_ms": percentile(publish_ms, 0.5), "publish_p99_ms": percentile(publish_ms, 0.99),
            "unpublish_p50_ms": percentile(unpublish_ms, 0.5), "unpublish_p99_ms": percentile(unpublish_ms, 0.99)}


def table(result: dict) -> str:
    rows = [f"cluster throughput: {result['nodes']} nodes x {result['concurrency_per_node']} at a time, "
            f"{result['pods_per_node']} pods per node",
            f"write budget {result['write_budget']} per node: ours and the ceiling at most "
            f"{result['ours']['in_flight']} Vault calls in flight, unbounded raw at {result['unbounded']['in_flight']}",
            f"{'':<12} {'pods/s':>8} {'pub p50':>9} {'pub p99':>9} {'unpub p50':>10} {'unpub p99':>10} {'req/pod':>8}"]
    for who in ("ours", "ceiling", "unbounded"):
        r = result[who]
        rows.append(f"{who:<12} {r['pods_per_s']:>8} {r['publish_p50_ms']:>9} {r['publish_p99_ms']:>9} "
                    f"{r['unpublish_p50_ms']:>10} {r['unpublish_p99_ms']:>10} {r['vault_requests_per_pod']:>8}")
    o, c = result["ours"], result["ceiling"]
    ours_cpu = o["agent_cpu_ms_per_pod"] + o["vault_cpu_ms_per_pod"] + o["client_cpu_ms_per_pod"]
    ceiling_cpu = c["vault_cpu_ms_per_pod"] + c["client_cpu_ms_per_pod"]
    rows.append(f"CPU ms per pod, ours: agents {o['agent_cpu_ms_per_pod']:.1f} + Vault {o['vault_cpu_ms_per_pod']:.1f} "
                f"+ kubelet stand-in {o['client_cpu_ms_per_pod']:.1f} = {ours_cpu:.1f}; ceiling: Vault "
                f"{c['vault_cpu_ms_per_pod']:.1f} + raw client {c['client_cpu_ms_per_pod']:.1f} = {ceiling_cpu:.1f} "
                f"(on {os.cpu_count()} CPUs shared by all; CPU-bound, the share is ~{ceiling_cpu / ours_cpu:.2f})")
    rows.append("ms per pod in the agents (mount/unmount: the agent's side of publish/unpublish; the others: Vault "
                "calls, waits for the write budget included): " + ", ".join(
                    f"{k} {v}" for k, v in sorted(o.get("agent_ms_per_pod", {}).items()) if v))
    p = result["paced"]
    rows.append(f"raw client held to ours' rate ({o['pods_per_s']} pods/s asked, {p['pods_per_s']} done, pub p50 "
                f"{p['publish_p50_ms']} ms): Vault CPU {p['vault_cpu_ms_per_pod']:.1f} ms per pod (ours "
                f"{o['vault_cpu_ms_per_pod']:.1f}, the ceiling's {c['vault_cpu_ms_per_pod']:.1f})")
    ld = result["loaded"]
    rows.append(f"ceiling with ours' node-side CPU burnt beside it ({ld['burnt_cpus']} CPUs): "
                f"{ld['pods_per_s']} pods/s "
                f"(pub p50 {ld['publish_p50_ms']} ms), Vault CPU {ld['vault_cpu_ms_per_pod']:.1f} ms per pod, "
                f"{ld['vault_ms_per_request']} ms per request; ours / that: {o['pods_per_s'] / ld['pods_per_s']:.2f}")
    rows.append(f"Vault's own ms per request (the active node's vault_core_handle_request): ours "
                f"{o['vault_ms_per_request']}, ceiling {c['vault_ms_per_request']}, "
                f"paced raw {p['vault_ms_per_request']}")
    rows.append(f"ours / unbounded raw: {result['unbounded_share']} (not the target: the budget caps ours); "
                f"raw 'not found' asked again of the active node: {result['ceiling']['asked_active']}")
    budgets = result["ours"]["write_budget_per_node"]
    rows.append("write budget per node (size/peak in flight/waits/refusals): " + ", ".join(
        f"{b.get('size', 0):.0f}/{b.get('peak', 0):.0f}/{b.get('waits', 0):.0f}/{b.get('refusals', 0):.0f}"
        for b in budgets))
    for who in ("ours", "ceiling"):
        for node, seen in (result[who].get("audit") or {}).items():
            rows.append(f"audit, {who}, {node}: {seen['connections']} client connections")
            rows += [f"  {n:>5}  {what}" for what, n in seen["requests"].items()]
            rows += [f"  {n:>5}  error: {what}" for what, n in seen["errors"].items()]
    rows += [f"{c['result']}  {c['name']}: {c['value']} ({c['rule']})" for c in result["targets"]]
    return "\n".join(rows)
