"""The lost-answer residual made visible (engine/intents.py): a create whose answer was lost after Vault
acted leaves a token nobody recorded; the intent written before the create was sent counts it, in
`status`, `doctor` and `/metrics`, with the time by which it has expired. A create that certainly
minted nothing (refused, rate-limited, never sent) leaves no intent.

Real OpenBao, the driver exec'd as the kubelet does (source and build); the loopback fault server
(tests/faultserver.py) only where Vault must act and its answer be lost.
"""

from __future__ import annotations

import calendar
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vaulttmpfs.config import Config
from vaulttmpfs.engine import intents, operation
from vaulttmpfs.engine.operation import Engine, MountRequest
from vaulttmpfs.engine.state import StateStore
from vaulttmpfs.errors import DriverError, VaultDenied, VaultRateLimited, VaultUnavailable

from .engine_fakes import FakeFilesystem, Journal, MemoryStore, VaultDouble
from .faultserver import CREATE, wait_for
from .kubelet import is_mount_point
from .vaultserver import closed_addr

NGINX = {"vault/policies": "nginx"}


def unrecorded(kubelet) -> dict:
    done = kubelet.call_cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["unrecorded"]


def seconds(iso: str) -> float:
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def strays(bao, before: set[str], pod) -> list[dict]:
    """The pod tokens Vault holds for `pod` that were not there `before` (found with the root token)."""
    found = [bao.lookup_accessor(a) for a in set(bao.accessors()) - before]
    return [t for t in found if t and (t.get("meta") or {}).get("pod_uid") == pod.uid]


def revoke_strays(bao, before: set[str], stray: dict) -> None:
    """The lost create's pod token, and its wrapping token: nobody holds either's accessor but the root token."""
    bao.request("POST", "auth/token/revoke-accessor", {"accessor": stray["accessor"]})
    for accessor in set(bao.accessors()) - before:
        info = bao.lookup_accessor(accessor)
        if info and info.get("policies") == ["response-wrapping"]:
            bao.request("POST", "auth/token/revoke-accessor", {"accessor": accessor})


def test_a_create_whose_answer_was_lost_is_counted_until_its_token_expires(bao, faulty, fault):
    pod = faulty.new_pod("lost-answer")
    before = set(bao.accessors())
    fault.add(CREATE, "forward-then-error", times=1, status=502)  # Vault mints; the gateway answers 502
    reply, path = faulty.mount(pod, NGINX)
    assert not reply.ok and "502" in reply.message, reply.body
    assert not is_mount_point(path)
    [stray] = strays(bao, before, pod)  # the one token the lost answer left alive
    try:
        found = unrecorded(faulty)
        assert found["count"] == 1, found
        [create] = found["creates"]
        assert (create["pod_uid"], create["policies"]) == (pod.uid, ["nginx"])
        assert "token_period (3600s)" in create["bound"]  # policies/applications_role.json
        # An upper bound: the token has expired by then (its expire_time is creation + period).
        expires = seconds(stray["expire_time"][:19] + "Z")
        assert expires <= seconds(found["until"]) <= expires + 60, (stray["expire_time"], found["until"])

        doctor = faulty.call_cli("doctor", "--json")
        checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
        assert checks["unrecorded"]["status"] == "FAIL"
        assert "token_period" in checks["unrecorded"]["fix"]

        # The kubelet's retry mounts; its token is recorded, so the count stays at the one stray.
        reply, path = faulty.mount(pod, NGINX)
        assert reply.ok, reply.body
        assert unrecorded(faulty)["count"] == 1
        assert faulty.teardown(path).ok
        assert unrecorded(faulty)["count"] == 1  # nothing can say the stray is gone before its bound
    finally:
        revoke_strays(bao, before, stray)


def test_a_create_that_minted_nothing_leaves_no_intent(bao, faulty, fault):
    before = set(bao.accessors())
    fault.add(CREATE, "error", times=1, status=403)  # refused
    reply, _ = faulty.mount(faulty.new_pod("refused"), NGINX)
    assert not reply.ok and "403" in reply.message, reply.body
    # A quota's 429 past the deadline (1 s here): answered before the handler.
    fault.add(CREATE, "error", status=429)
    reply = faulty.call("mount", *_args(faulty, "rate-limited"),
                        env={**faulty.env, "VAULT_CLIENT_TIMEOUT": "500ms", "VAULT_MAX_RETRIES": "0"})
    fault.clear()
    assert not reply.ok and "rate-limit quota" in reply.message, reply.body
    # Nothing listening: the create never went out.
    reply = faulty.call("mount", *_args(faulty, "unreachable"), env={**faulty.env, "VAULT_ADDR": closed_addr()})
    assert not reply.ok and "cannot reach Vault" in reply.message, reply.body
    assert unrecorded(faulty)["count"] == 0
    assert set(bao.accessors()) == before
    # A gateway's bare 500 may come after Vault acted, or not: it is counted (an upper bound).
    fault.add(CREATE, "error", times=1, status=500)
    reply, _ = faulty.mount(faulty.new_pod("gateway-500"), NGINX)
    assert not reply.ok and unrecorded(faulty)["count"] == 1


def _args(kubelet, name: str) -> tuple[str, str]:
    pod = kubelet.new_pod(name)
    path = kubelet.volume_dir(pod)
    return str(path), json.dumps(kubelet.options(pod, "token", NGINX))


def test_a_driver_killed_while_vault_answers_leaves_its_intent_for_status(bao, faulty, fault):
    pod = faulty.new_pod("killed")
    before = set(bao.accessors())
    fault.add(CREATE, "hold-answer", times=1)  # Vault acts; its answer is held back
    path = faulty.volume_dir(pod)
    proc = subprocess.Popen([*faulty.driver_cmd, "mount", str(path), json.dumps(faulty.options(pod, "token", NGINX))],
                            env=faulty.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert fault.arrived.wait(30)
        assert wait_for(lambda: strays(bao, before, pod), timeout=10)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        fault.release.set()
    [stray] = strays(bao, before, pod)
    try:
        assert unrecorded(faulty)["count"] == 1  # written (fsync'd) before the create went out
        reply, path = faulty.mount(pod, NGINX)  # the kubelet's retry on the same volume
        assert reply.ok, reply.body
        assert unrecorded(faulty)["count"] == 1
        lines = [json.loads(line) for line in Path(faulty.env["VAULTTMPFS_LOG_FILE"]).read_text().splitlines()]
        assert [line for line in lines if line.get("pod_uid") == pod.uid and line.get("level") == "warning"
                and "an earlier token create for this volume lost its answer" in line.get("event", "")]
        assert faulty.teardown(path).ok
    finally:
        revoke_strays(bao, before, stray)


def test_reconcile_forgets_an_intent_once_its_bound_has_passed(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    name, synced = store.add_intent("/pods/x/volumes/v", {"at": 1000.0, "until": 5000.0, "bound": "test"})
    synced.wait()
    assert [i["name"] for i in intents.outstanding(store, now=4999.0)] == [name]
    assert intents.prune(store, now=4999.0) == 0
    assert intents.prune(store, now=5000.0) == 1
    assert store.list_intents() == [] and intents.summary(store, now=0)["count"] == 0


def test_a_role_bound_is_its_shortest_lifetime():
    assert intents.role_lifetime({"token_period": 3600, "token_explicit_max_ttl": 0})[0] == 3600
    assert intents.role_lifetime({"token_period": 3600, "token_explicit_max_ttl": 600})[0] == 600
    assert intents.role_lifetime({"token_ttl": 120})[0] == 120
    assert intents.role_lifetime({})[0] == intents.DEFAULT_MAX_TTL


def test_metrics_count_unrecorded_tokens(tmp_path):
    from vaulttmpfs.config import Config
    from vaulttmpfs.node.metrics import NodeState

    store = StateStore(str(tmp_path / "state"))
    store.add_intent("/pods/x/volumes/v", {"at": time.time(), "until": time.time() + 3600, "bound": "test"})[1].wait()
    families = {f.name: f for f in NodeState(Config(state_dir=store.root), []).collect()}
    assert families["vaulttmpfs_unrecorded_tokens"].samples[0].value == 1
    assert families["vaulttmpfs_unrecorded_tokens_alive_until_seconds"].samples[0].value > time.time()




# --- the engine's side, in-process over tests/engine_fakes.py: which failures keep the intent

def sent_then_lost() -> VaultUnavailable:
    return VaultUnavailable("creating a token: Vault at ... did not answer in time (not resent)")


def refused_before_sending() -> VaultUnavailable:
    exc = VaultUnavailable("creating a token: cannot reach Vault: connection refused")
    exc.unsent = True
    return exc


@pytest.mark.parametrize("step, error, kept", [
    (None, None, 0),  # mounted: the token is recorded
    ("create token", sent_then_lost(), 1),  # the answer was lost: may be alive
    ("create token", refused_before_sending(), 0),
    ("create token", VaultRateLimited("429"), 0),
    ("create token", VaultDenied("403 permission denied"), 0),
    ("write vault-token", None, 0),  # minted, then the mount failed: revoked by the undo, so known
], ids=["mounted", "lost-answer", "never-sent", "rate-limited", "refused", "failed-after-mint"])
def test_the_intent_is_kept_only_when_a_token_may_be_alive_unrecorded(tmp_path, monkeypatch, step, error, kept):
    monkeypatch.setattr(operation, "_generator_checks", {})
    journal = Journal()
    store, vault = MemoryStore(journal), VaultDouble(journal)
    generator = tmp_path / "generator-token"
    generator.write_text("s.generator-token\n")
    generator.chmod(0o600)
    pods = tmp_path / "pods"
    mount_dir = pods / "0f1e2d3c-aaaa-bbbb-cccc-000000000001" / "volumes" / "cloudwatt~vaulttmpfs" / "vault"
    mount_dir.mkdir(parents=True)
    config = Config(generator_token_path=str(generator), state_dir=str(tmp_path / "state"), log_file="",
                    pods_dir=str(pods), node_name="node-1")
    journal.fail_at, journal.fail_with = step, error
    request = MountRequest(mount_dir=str(mount_dir), policies=["nginx"], role="applications",
                           pod_namespace="default", pod_name="nginx", volume_name="vault")
    try:
        Engine(config, store=store, vault=vault, fs=FakeFilesystem(journal)).mount(request)
    except DriverError:  # Injected, the Vault errors, and a refusal the engine words for the operator
        assert step
    assert len(store.intents) == kept
    if kept:
        [intent] = store.intents.values()
        assert intent["policies"] == ["nginx"] and intent["until"] > intent["at"] + 3600  # the double's period
