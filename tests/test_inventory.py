"""The node's token inventory (docs/inventory.md): `vaulttmpfs status` and the agent's /metrics show
the pod tokens this node holds alive in Vault (by namespace, oldest age, soonest expiry), the ones
Vault no longer has, revocations queued, and the revocation latency; the PrometheusRule and Grafana
dashboard examples parse (the real `promtool`) and name only series the agent exports.

A real agent serving CSI, real OpenBao, real tmpfs, the kubelet's calls (tests/csikubelet.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
import yaml

from .agents import scrape, value
from .conftest import eventually, remember_secret, source_cmd
from .csikubelet import new_pod
from .csinode import CsiNode
from .vaultserver import REPO, free_port
from .volumes import read_volume

NGINX = {"vault/policies": "nginx"}
MONITORING = REPO / "installer" / "examples" / "monitoring"


@pytest.fixture(scope="module")
def node(bao, generator, log_dir, tmp_path_factory):
    port = free_port()
    node = CsiNode(source_cmd(), bao, generator, tmp_path_factory.mktemp("inventory-node"), log_dir,
                   VAULTTMPFS_METRICS_ADDR=f"127.0.0.1:{port}", VAULTTMPFS_INVENTORY_INTERVAL="1s").start()
    node.metrics_port = port
    yield node
    node.stop()



def status(node: CsiNode) -> dict:
    out = subprocess.run([*node.cmd, "status", "--json"], capture_output=True, text=True, env=node.env, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_status_and_metrics_show_the_tokens_alive_by_namespace_their_age_and_expiry(node, bao):
    kubelet = node.kubelet
    pods = [new_pod("inv-a", namespace="shop"), new_pod("inv-b", namespace="shop"),
            new_pod("inv-c", namespace="default")]
    started = time.time()
    paths = [kubelet.publish(pod, NGINX) for pod in pods]
    for path in paths:
        remember_secret((path / "vault-token").read_text())
    accessors = [read_volume(path)[1]["wrapped_accessor"] for path in paths]

    def counted():
        samples = scrape(node.metrics_port)
        alive = {ns: value(samples, "vaulttmpfs_tokens_alive", pod_namespace=ns) for ns in ("shop", "default")}
        return samples if alive == {"shop": 2, "default": 1} else None

    samples = eventually(counted, "the inventory to count 2 shop and 1 default tokens")
    # Vault's own view of the tokens: the role's 1h period, created just now.
    ttls = [bao.lookup_accessor(a)["ttl"] for a in accessors]
    next_expiry = value(samples, "vaulttmpfs_token_next_expiry_seconds")
    assert min(ttls) - 30 <= next_expiry <= max(ttls) + 2
    assert 0 <= value(samples, "vaulttmpfs_token_oldest_age_seconds") <= time.time() - started + 5
    assert value(samples, "vaulttmpfs_tokens_gone") == 0
    assert value(samples, "vaulttmpfs_inventory_age_seconds") < 30

    # A token revoked behind the node's back (or expired): the inventory says it is gone.
    bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessors[2]})
    samples = eventually(lambda: (s := scrape(node.metrics_port)) and value(s, "vaulttmpfs_tokens_gone") == 1 and s,
                       "the inventory to see the revoked token gone")
    assert value(samples, "vaulttmpfs_tokens_alive", pod_namespace="default") == 0

    report = status(node)
    inventory = report["inventory"]
    assert inventory["alive_by_namespace"] == {"shop": 2} and inventory["gone"] == 1
    assert inventory["taken_seconds_ago"] < 30 and inventory["next_expiry_seconds"] <= max(ttls)
    by_uid = {v["pod_uid"]: v for v in report["volumes"]}
    assert by_uid[pods[2].uid]["alive"] is False and by_uid[pods[0].uid]["alive"] is True
    assert 0 < by_uid[pods[0].uid]["expires_in_seconds"] <= max(ttls)
    text = subprocess.run([*node.cmd, "status"], capture_output=True, text=True, env=node.env, timeout=60).stdout
    assert "2 alive (shop 2)" in text and "1 gone from Vault" in text
    [line] = [line for line in text.splitlines() if pods[2].name in line]
    assert " gone " in line
    # Nothing a token could be rebuilt from: accessors are shown as a prefix, tokens never.
    assert not any(a in json.dumps(report) for a in accessors)

    before = value(scrape(node.metrics_port), "vaulttmpfs_revocation_latency_seconds_count")
    for pod in pods:
        kubelet.teardown(pod)
    samples = scrape(node.metrics_port)
    # Each pod token and its wrapping token: one latency each, a revoke round trip well under 5 s.
    assert value(samples, "vaulttmpfs_revocation_latency_seconds_count") == before + 6
    assert value(samples, "vaulttmpfs_revocation_latency_seconds_bucket", le="5.0") == \
        value(samples, "vaulttmpfs_revocation_latency_seconds_count")
    eventually(lambda: not any(k[0] == "vaulttmpfs_tokens_alive" and v for k, v in scrape(node.metrics_port).items()),
             "no token counted alive once the pods are gone")
    assert all(bao.lookup_accessor(a) is None for a in accessors)


# --- The monitoring examples -----------------------------------------------------------------------------

def rule_groups() -> dict:
    [rule] = [d for d in yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()) if d]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    return rule["spec"]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "no promtool: tests/system-deps.sh installs Debian's prometheus package (it ships promtool)"
    return found


def check_rules(tmp_path, groups: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(groups))
    return subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


SERIES = re.compile(r"\bvaulttmpfs_[a-z_]+\b")


def test_the_prometheus_rule_and_the_dashboard_parse_and_name_only_series_the_agent_exports(node, tmp_path):
    groups = rule_groups()
    out = check_rules(tmp_path, groups)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    # The dashboard's queries through the same parser, as recording rules.
    exprs = dashboard_exprs()
    as_rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"vaulttmpfs:panel{i}", "expr": e}
                                                           for i, e in enumerate(exprs)]}]}
    out = check_rules(tmp_path, as_rules)
    assert out.returncode == 0, out.stdout + out.stderr
    # The parser is real: a broken expression fails.
    assert check_rules(tmp_path, {"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum by (("}]}]}
                       ).returncode != 0
    # Every series named exists in the agent's /metrics (a publish and a teardown make the histograms appear).
    pod = new_pod(namespace="shop")
    remember_secret((node.kubelet.publish(pod, NGINX) / "vault-token").read_text())
    eventually(lambda: value(scrape(node.metrics_port), "vaulttmpfs_tokens_alive", pod_namespace="shop") == 1,
             "the inventory to count the pod")
    exported = {name for name, _labels in scrape(node.metrics_port)}
    node.kubelet.teardown(pod)
    exported |= {name for name, _labels in scrape(node.metrics_port)}
    named = {m for group in groups["groups"] for rule in group["rules"] for m in SERIES.findall(rule["expr"])}
    named |= {m for e in exprs for m in SERIES.findall(e)}
    assert {"vaulttmpfs_tokens_alive", "vaulttmpfs_pending_revocations", "vaulttmpfs_revocation_latency_seconds_bucket",
            "vaulttmpfs_token_oldest_age_seconds", "vaulttmpfs_token_next_expiry_seconds"} <= named
    assert named <= exported, named - exported
    # Labels the queries group by are ones the series carry (pod_namespace, not the scrape's namespace).
    assert "by (pod_namespace)" in " ".join(exprs)


def test_a_rotations_old_tokens_in_their_grace_are_kept_apart_from_the_pending_revocations(node, bao):
    """After a rotation that went well, its old tokens wait for the pod (or the grace): the gauge the
    VaulttmpfsRevocationsQueued alert reads, doctor's revocations check and status leave them out and
    count them apart; once the pod is gone, the retry revokes them and nothing waits."""
    pod = new_pod("inv-rotated", namespace="shop")
    path = node.kubelet.publish(pod, NGINX)
    remember_secret((path / "vault-token").read_text())
    old = read_volume(path)[1]
    out = subprocess.run([*node.cmd, "rotate", "--pod-uid", pod.uid, "--grace", "1h"], capture_output=True,
                         text=True, env=node.env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    remember_secret((path / "vault-token").read_text())

    samples = scrape(node.metrics_port)
    assert value(samples, "vaulttmpfs_pending_revocations") == 0
    assert value(samples, "vaulttmpfs_rotation_revocations_waiting") == 2  # the old pod and wrapping tokens
    report = status(node)
    assert report["pending"] == []
    assert [w["pod_uid"] for w in report["rotation_waiting"]] == [pod.uid, pod.uid]
    assert old["wrapped_accessor"][:8] in {w["accessor"] for w in report["rotation_waiting"]}
    text = subprocess.run([*node.cmd, "status"], capture_output=True, text=True, env=node.env, timeout=60).stdout
    assert "0 pending revocation(s), 2 kept by a rotation" in text
    doctor = subprocess.run([*node.cmd, "doctor", "--json"], capture_output=True, text=True, env=node.env,
                            timeout=120)
    [check] = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "revocations"]
    assert check["status"] == "OK" and "2 old token(s) a rotation keeps" in check["detail"], check

    node.kubelet.teardown(pod)
    assert subprocess.run([*node.cmd, "retry-revocations"], env=node.env, timeout=120).returncode == 0
    assert bao.lookup_accessor(old["wrapped_accessor"]) is None
    samples = scrape(node.metrics_port)
    assert value(samples, "vaulttmpfs_pending_revocations") == 0
    assert value(samples, "vaulttmpfs_rotation_revocations_waiting") == 0
