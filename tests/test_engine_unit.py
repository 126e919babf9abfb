"""The engine in-process, over the doubles of tests/engine_fakes.py: the order of a mount's steps, the
undo of each step a failure leaves done, idempotency, unmount, and every record shape earlier versions
wrote. No root, no OpenBao, no tmpfs: a few seconds. The integration suite checks the same verbs for
real (test_driver, test_csi, test_faults...)."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vaulttmpfs.config import Config
from vaulttmpfs.engine import bindings, operation
from vaulttmpfs.engine import record as records
from vaulttmpfs.engine.operation import Engine, MountRequest, PodLogin
from vaulttmpfs.engine.record import GONE, NOTHING, QUEUED, REVOKED, MadeWith, Revocation, VolumeRecord
from vaulttmpfs.errors import Conflict, DriverError, Forbidden, VaultDenied

from .engine_fakes import FakeFilesystem, Injected, Journal, MemoryStore, VaultDouble

POD_UID = "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
FILES = ["write vault-token.json", "write vault-token"]
TOKEN_UNDO = ["revoke", "revoke", "forget record"]  # the pod token, its wrapping token, then the record

# Each shape of volumes/<key>.json a released version wrote (the state dir outlives an upgrade).
RECORD_BEFORE_MADE_WITH = {  # 23f2ea3 .. e6a30eb: no read_only / fs_group
    "mount_dir": f"/var/lib/kubelet/pods/{POD_UID}/volumes/cloudwatt~vaulttmpfs/vault",
    "accessor": "pod-acc", "wrapping_accessor": "wrap-acc", "role": "applications", "policies": ["nginx"],
    "pod_uid": POD_UID, "namespace": "default", "pod": "nginx",
}
RECORD_WITH_MADE_WITH = {**RECORD_BEFORE_MADE_WITH, "read_only": True, "fs_group": 2000}  # e6a30eb ..
RECORD_UNWRAPPED = {**RECORD_BEFORE_MADE_WITH, "wrapping_accessor": None, "read_only": False, "fs_group": None}
RECORD_WITH_UNWRAP = {**RECORD_UNWRAPPED, "unwrapped": True}  # from this change on: vault/unwrap kept
RECORD_WITH_IDENTITY = {**RECORD_WITH_UNWRAP, "service_account": "default", "volume_name": "vault"}  # and these


class Node:
    """A node's engine over the doubles; a fresh Engine per call, as the front ends make one."""

    def __init__(self, tmp_path: Path):
        self.journal = Journal()
        self.store = MemoryStore(self.journal)
        self.vault = VaultDouble(self.journal)
        self.fs = FakeFilesystem(self.journal)
        self.pods = tmp_path / "pods"
        generator = tmp_path / "generator-token"
        generator.write_text("s.generator-token\n")
        generator.chmod(0o600)
        self.config = Config(generator_token_path=str(generator), state_dir=str(tmp_path / "state"), log_file="",
                             pods_dir=str(self.pods), node_name="node-1")

    def engine(self) -> Engine:
        return Engine(self.config, store=self.store, vault=self.vault, fs=self.fs)

    def volume_dir(self, name: str = "vault", pod_uid: str = POD_UID) -> str:
        path = self.pods / pod_uid / "volumes" / "cloudwatt~vaulttmpfs" / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def request(self, **changes) -> MountRequest:
        base = MountRequest(mount_dir=changes.pop("mount_dir", None) or self.volume_dir(), policies=["nginx"],
                            role="applications", pod_namespace="default", pod_name="nginx",
                            service_account="default", volume_name="vault")
        return base.replace(**changes)

    def mount(self, request: MountRequest | None = None, **kwargs) -> str:
        return self.engine().mount(request or self.request(), **kwargs)

    def files(self, mount_dir: str) -> dict[str, bytes]:
        return self.fs.mounts[os.path.realpath(mount_dir)]

    def since(self, mark: int) -> list[str]:
        return self.journal.names()[mark:]


@pytest.fixture
def node(tmp_path, monkeypatch) -> Node:
    monkeypatch.setattr(operation, "_generator_checks", {})  # each test checks its generator afresh
    return Node(tmp_path)


def test_a_mount_mints_then_records_then_mounts_then_writes(node):
    request = node.request(read_only=True, fs_group=2000)
    assert node.mount(request) == "token for policies nginx mounted"
    assert node.journal.names() == ["lock", "create token", "write record", "mount tmpfs", "open tmpfs", *FILES,
                                    "remount read-only", "unlock"]
    files = node.files(request.mount_dir)
    info = json.loads(files["vault-token.json"])
    assert files["vault-token"] == info["token"].encode() and info["wrapped_accessor"] in node.vault.alive
    record = node.store.volumes[request.mount_dir]
    assert (record.accessor, record.wrapping_accessor) == (info["wrapped_accessor"], info["accessor"])
    assert record.made_with == MadeWith(read_only=True, fs_group=2000, unwrapped=False) and record.pod_uid == POD_UID
    assert set(node.vault.tokens_used) == {"s.generator-token"}  # the generator check, then the create


def test_a_mount_records_the_pods_service_account_and_volume_and_names_its_token_by_them(node):
    """What a rotation mints from later (engine.rotate): the record keeps the service account (the policy
    bindings are checked with it again) and the volume's name; the token's metadata and display name are
    built from the same identity, by the same function a rotation uses."""
    request = node.request()
    node.mount(request)
    record = node.store.volumes[request.mount_dir]
    assert (record.service_account, record.volume_name) == ("default", "vault")
    [(metadata, display_name)] = node.vault.created
    assert metadata == {"created_by": "vaulttmpfs", "namespace": "default", "pod": "nginx", "pod_uid": POD_UID,
                        "service_account": "default", "volume": "vault", "node": "node-1"}
    assert display_name == "vaulttmpfs-default-POD-nginx"
    assert record.token_identity("node-1") == (metadata, display_name)
    assert record.token_identity("node-1", rotated_from="pod-1") == ({**metadata, "rotated_from": "pod-1"},
                                                                     display_name)


def test_a_mount_without_the_volumes_name_takes_it_from_the_kubelets_path(node):
    request = node.request(volume_name="", mount_dir=node.volume_dir("creds"))
    node.mount(request)
    assert node.store.volumes[request.mount_dir].volume_name == "creds"
    assert node.vault.created[0][0]["volume"] == "creds"


def vault_display_name(namespace: str, pod: str) -> str:
    """The display name as Vault keeps it: "token-" + the name, each character but [A-Za-z0-9-] made a
    `-` (OpenBao's token store, as Vault's; checked against the dev server: "vaulttmpfs-team-a.web" is
    kept as "token-vaulttmpfs-team-a-web")."""
    return "token-" + re.sub(r"[^A-Za-z0-9-]", "-", records.token_identity("n", namespace, pod, "", "", "")[1])


def test_display_names_keep_namespace_and_pod_apart_as_vault_keeps_them():
    pairs = [("team-a", "web"), ("team", "a-web"), ("team-a-web", "x"), ("t", "eam-a-web"), ("team-a", "web.v2")]
    assert len({vault_display_name(*pair) for pair in pairs}) == len(pairs)
    assert vault_display_name("team-a", "web") == "token-vaulttmpfs-team-a-POD-web"
    # The longest namespace (63) and pod name (253): cut to 100, only the pod name's end goes.
    name = records.token_identity("n", "n" * 63, "p" * 253, "", "", "")[1]
    assert len(name) == 100 and name.startswith("vaulttmpfs-" + "n" * 63 + "-POD-ppp")


BINDINGS_FOR_A_ROTATION = [  # (bindings, the policy asked for, allowed without the service account?)
    ({"bindings": [{"namespaces": ["default"], "policies": ["nginx"]}]}, "nginx", True),
    ({"bindings": [{"namespaces": ["default"], "service_accounts": ["*"], "policies": ["nginx"]}]}, "nginx", True),
    # Only service account "default" has it: whatever name stands in for the unknown one, refused.
    ({"bindings": [{"namespaces": ["default"], "service_accounts": ["default"], "policies": ["nginx"]}]}, "nginx",
     False),
    ({"bindings": [{"namespaces": ["*"], "policies": ["{service_account}"]}]}, "default", False),
    ({"bindings": [{"namespaces": ["*"], "policies": ["{service_account}_db", "ngin*"]}]}, "nginx", True),
    ({"bindings": [{"namespaces": ["shop"], "policies": ["nginx"]}]}, "nginx", False),
]


@pytest.mark.parametrize("document, policy, allowed", BINDINGS_FOR_A_ROTATION)
def test_a_record_without_its_service_account_is_allowed_only_what_every_service_account_is(document, policy,
                                                                                             allowed):
    """A volume record an older version wrote names no service account: a rotation may mint only what
    the bindings give every service account of the namespace, and says when they need the one it lacks."""
    found = bindings.parse(json.dumps(document), "bindings.json")
    if allowed:
        bindings.check_without_service_account(found, "default", [policy])
    else:
        with pytest.raises(Forbidden, match="need the pod's service account, which the volume's record does not "
                                            f"name .*namespace 'default' allows {policy}$"):
            bindings.check_without_service_account(found, "default", [policy])


def test_the_mount_dir_is_resolved_once_per_call(node):
    request = node.request()
    node.mount(request)
    assert node.fs.resolved == [request.mount_dir]
    node.fs.resolved.clear()
    node.engine().unmount(request.mount_dir)
    assert node.fs.resolved == [request.mount_dir]


STEPS = ["create token", "write record", "mount tmpfs", "open tmpfs", *FILES, "remount read-only"]


@pytest.mark.parametrize("step, undo", [
    ("create token", []),
    ("write record", TOKEN_UNDO),
    ("mount tmpfs", TOKEN_UNDO),  # nothing mounted: nothing to unmount
    ("open tmpfs", ["unmount", *TOKEN_UNDO]),
    ("write vault-token.json", ["unmount", *TOKEN_UNDO]),
    ("write vault-token", ["unmount", *TOKEN_UNDO]),
    ("remount read-only", ["unmount", *TOKEN_UNDO]),
])
def test_a_failing_step_undoes_every_step_before_it_newest_first_under_the_lock(node, step, undo):
    node.journal.fail_at = step
    with pytest.raises(Injected):
        node.mount(node.request(read_only=True))
    done = STEPS[:STEPS.index(step)]
    assert node.journal.names() == ["lock", *done, *undo, "unlock"]  # the lock goes after the undo
    assert not node.vault.alive and not node.store.volumes and not node.fs.mounts and not node.store.held
    revoked = [event[1] for event in node.journal.events if event[0] == "revoke"]
    assert [a.split("-")[0] for a in revoked] == (["pod", "wrapping"] if done else [])


class RevocationLatencies:
    """The agent's metrics sink (node.metrics.Metrics), keeping only the revocation latencies."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def revocation(self, seconds: float) -> None:
        self.seen.append(seconds)

    def vault_call(self, *_args) -> None:
        pass


def test_a_queued_revocation_counts_its_latency_from_when_it_was_first_queued(node):
    import time

    from vaulttmpfs import telemetry

    node.journal.fail_at = "write vault-token"
    node.vault.unreachable = True
    with pytest.raises(Injected):
        node.mount()
    queued_at = time.time() - 600  # queued ten minutes ago
    for pending in node.store.pending.values():
        pending["since"] = queued_at
    sink = RevocationLatencies()
    telemetry.set_sink(sink)
    try:
        assert node.engine().retry_pending() == {"revoked": 0, "pending": 2, "waiting": 0}  # Vault still away
        assert {p["since"] for p in node.store.pending.values()} == {queued_at}  # a failed retry keeps it
        assert sink.seen == []
        node.vault.unreachable = False
        assert node.engine().retry_pending() == {"revoked": 2, "pending": 0, "waiting": 0}
    finally:
        telemetry.set_sink(None)
    assert len(sink.seen) == 2 and all(600 <= latency < 660 for latency in sink.seen)  # the pod and wrapping tokens


def test_a_token_vault_cannot_revoke_during_undo_is_queued_before_its_record_goes(node):
    node.journal.fail_at = "write vault-token"
    node.vault.unreachable = True
    with pytest.raises(Injected):
        node.mount()
    assert sorted(node.store.pending) == sorted(node.vault.alive)  # both tokens wait for the agent's retry
    assert node.since(0)[-3:] == ["queue revocation", "forget record", "unlock"]
    node.vault.unreachable = False
    assert node.engine().retry_pending() == {"revoked": 2, "pending": 0, "waiting": 0}
    assert not node.vault.alive and not node.store.pending


def test_a_second_mount_of_a_complete_volume_mints_nothing(node):
    request = node.request()
    node.mount(request)
    files, mark = dict(node.files(request.mount_dir)), len(node.journal.events)
    assert node.mount(request) == "already mounted"
    assert node.since(mark) == ["lock", "unlock"]
    assert node.files(request.mount_dir) == files and len(node.vault.alive) == 2


def test_concurrent_mounts_of_one_volume_mint_one_token(node):
    request = node.request()
    with ThreadPoolExecutor(6) as pool:
        answers = sorted(pool.map(lambda _: node.mount(request), range(6)))
    assert answers == ["already mounted"] * 5 + ["token for policies nginx mounted"]
    assert node.journal.names().count("create token") == 1 and len(node.vault.alive) == 2


def test_a_republish_asking_for_another_read_only_or_fs_group_is_a_conflict(node):
    request = node.request(fs_group=2000)
    node.mount(request)
    alive = set(node.vault.alive)
    with pytest.raises(Conflict, match="readOnly=false, fsGroup=2000; this call asks for readOnly=true"):
        node.mount(request.replace(read_only=True))
    assert node.vault.alive == alive and request.mount_dir in node.store.volumes


@pytest.mark.parametrize("change, shown", [
    ({"policies": ["other"]}, "vault/policies=nginx; this call asks for readOnly=false, fsGroup=none, "
                              "vault/policies=other"),
    ({"policies": ["nginx", "other"]}, "vault/policies=nginx,other"),
    ({"role": "Applications2"}, "vault/role=applications; this call asks for readOnly=false, fsGroup=none, "
                                "vault/role=Applications2"),
    ({"unwrapped": True}, "vault/unwrap=false; this call asks for readOnly=false, fsGroup=none, vault/unwrap=true"),
])
def test_a_republish_asking_for_another_token_is_a_conflict(node, change, shown):
    """The CSI spec's ALREADY_EXISTS: not an OK that leaves the pod the token minted for other attributes."""
    request = node.request()
    node.mount(request)
    alive, files = set(node.vault.alive), dict(node.files(request.mount_dir))
    with pytest.raises(Conflict, match="unpublish it first") as refused:
        node.mount(request.replace(**change))
    assert shown in str(refused.value)
    assert node.vault.alive == alive and node.files(request.mount_dir) == files
    assert node.mount(request.replace(policies=list(reversed(request.policies)))) == "already mounted"


def test_a_record_from_before_unwrap_was_kept_takes_either_unwrap(node):
    request = node.request(unwrapped=True)
    node.mount(request)
    record = node.store.volumes[request.mount_dir]
    written_before = {key: value for key, value in record.to_json().items() if key != "unwrapped"}
    node.store.volumes[request.mount_dir] = VolumeRecord.from_json(written_before)
    assert node.store.volumes[request.mount_dir].made_with.unwrapped is None
    assert node.mount(request) == "already mounted"
    assert node.mount(request.replace(unwrapped=False)) == "already mounted"


def test_a_record_from_before_made_with_takes_the_volume_as_it_is(node):
    request = node.request()
    node.mount(request)
    old = VolumeRecord.from_json({**RECORD_BEFORE_MADE_WITH, "mount_dir": request.mount_dir,
                                  "accessor": node.store.volumes[request.mount_dir].accessor})
    node.store.volumes[request.mount_dir] = old
    assert node.mount(request.replace(read_only=True, fs_group=3000)) == "already mounted"


def test_a_stale_record_is_revoked_before_the_new_token_is_minted(node):
    """A tmpfs lost with a reboot: the record names a token nobody holds any more."""
    request = node.request()
    node.mount(request)
    stale = set(node.vault.alive)
    node.fs.mounts.clear()
    mark = len(node.journal.events)
    node.mount(request)
    assert node.since(mark)[:5] == ["lock", "revoke", "revoke", "forget record", "create token"]
    assert not stale & node.vault.alive and len(node.vault.alive) == 2


def test_a_half_made_tmpfs_of_ours_is_unmounted_and_its_token_revoked(node):
    request = node.request()
    node.mount(request)
    del node.files(request.mount_dir)["vault-token"]  # killed before the token file was written
    stale, mark = set(node.vault.alive), len(node.journal.events)
    node.mount(request)
    assert node.since(mark)[:6] == ["lock", "unmount", "revoke", "revoke", "forget record", "create token"]
    assert not stale & node.vault.alive and "vault-token" in node.files(request.mount_dir)


def test_someone_elses_mount_point_is_left_alone_and_nothing_is_minted(node):
    request = node.request()
    node.fs.foreign.add(os.path.realpath(request.mount_dir))
    with pytest.raises(DriverError, match="does not own"):
        node.mount(request)
    assert node.journal.names() == ["lock", "unlock"] and not node.vault.alive


def test_a_plain_token_where_a_wrapped_one_was_asked_for_is_revoked_and_never_written(node):
    node.vault.strip_wrapping = True
    with pytest.raises(DriverError, match="that token was not given to the pod: token revoked"):
        node.mount()
    assert not node.vault.alive and not node.fs.mounts and not node.store.volumes


def test_unwrapped_the_metadata_file_never_holds_the_token(node):
    request = node.request(unwrapped=True)
    node.mount(request)
    files = node.files(request.mount_dir)
    info = json.loads(files["vault-token.json"])
    assert "client_token" not in info and info["unwrapped"] is True
    assert files["vault-token"].decode() not in files["vault-token.json"].decode()
    assert node.store.volumes[request.mount_dir].wrapping_accessor is None


def test_a_pod_login_uses_no_generator_token_for_the_token(node):
    node.mount(node.request(login=PodLogin("jwt", "header.payload.signature"), policies=[]))
    assert "login" in node.journal.names() and "create token" not in node.journal.names()
    assert None in node.vault.tokens_used  # the login carries the pod's JWT, not the generator token


def test_a_role_the_generator_may_not_use_is_the_pods_fault_unless_it_is_the_nodes_role(node, monkeypatch):
    """Vault's 403 on auth/token/create/<role>: for the node's own role the generator token is to blame;
    for a role the pod named (vault/role), the pod's attribute is, and the message says so."""
    def denied(role, *_args, **_kwargs):
        raise VaultDenied(f"creating a token: 403 permission denied (auth/token/create/{role})")

    monkeypatch.setattr(node.vault, "create_wrapped_token", denied)
    with pytest.raises(Forbidden, match="the volume's `vault/role` 'nosuchrole' is not a role this node may") as pod:
        node.mount(node.request(role="nosuchrole"))
    assert "bootstrap" not in str(pod.value) and "'applications'" in str(pod.value)
    with pytest.raises(DriverError, match="re-run `vaulttmpfs bootstrap`") as generator:
        node.mount(node.request(role=node.config.role_name))
    assert not isinstance(generator.value, Forbidden)
    assert not node.vault.alive and not node.store.volumes


def test_a_root_generator_token_is_refused_before_anything_is_minted(node):
    node.vault.generator_policies = ["root"]
    with pytest.raises(DriverError, match="carries the root policy"):
        node.mount()
    assert node.journal.names() == ["lock", "unlock"]


def test_admission_refuses_a_spoofed_pod_uid_before_the_lock(node):
    with pytest.raises(Forbidden, match="spoofed identity"):
        node.mount(node.request(pod_uid="another-pod"))
    assert node.journal.names() == []


def test_the_front_ends_own_step_runs_under_the_lock_and_is_undone_last_still_under_it(node):
    """CSI makes the target dir in the call: made and (on failure) removed while the volume's lock is
    held, so a call waiting on the lock never checks a dir that is then removed under it."""
    def prepare():
        node.journal.step("make dir")
        return lambda: node.journal.step("remove dir")

    node.mount(node.request(), prepare=prepare)
    assert node.journal.names()[:3] == ["lock", "make dir", "create token"] and "remove dir" not in node.journal.names()
    node.journal.fail_at = "write vault-token"
    mark = len(node.journal.events)
    with pytest.raises(Injected):
        node.mount(node.request(mount_dir=node.volume_dir("other")), prepare=prepare)
    assert node.since(mark)[:2] == ["lock", "make dir"]
    assert node.since(mark)[-3:] == ["forget record", "remove dir", "unlock"]  # after the engine's undo, locked
    mark = len(node.journal.events)
    with pytest.raises(Forbidden):  # refused before the lock: the front end's step never ran
        node.mount(node.request(pod_uid="another-pod"), prepare=prepare)
    assert node.since(mark) == []


def test_a_prepared_dir_that_is_no_directory_is_refused_under_the_lock(node):
    """The target is checked after the front end's step, not before it (it may not exist yet)."""
    mount_dir = node.volume_dir("target")
    os.rmdir(mount_dir)
    with pytest.raises(DriverError, match="does not exist"):
        node.mount(node.request(mount_dir=mount_dir), prepare=lambda: None)
    assert node.journal.names() == ["lock", "unlock"] and not node.vault.alive


def test_the_front_ends_last_unmount_step_runs_under_the_lock(node):
    request = node.request()
    node.mount(request)
    mark = len(node.journal.events)
    node.engine().unmount(request.mount_dir, finish=lambda: node.journal.step("remove dir"))
    assert node.since(mark) == ["lock", "revoke", "revoke", "unmount", "forget record", "remove dir", "unlock"]


def test_unmount_revokes_both_tokens_then_unmounts_then_forgets(node):
    request = node.request()
    node.mount(request)
    mark = len(node.journal.events)
    message = node.engine().unmount(request.mount_dir)
    assert message.startswith("unmounted; token revoked (accessor pod-")
    assert node.since(mark) == ["lock", "revoke", "revoke", "unmount", "forget record", "unlock"]
    assert not node.vault.alive and not node.fs.mounts and not node.store.volumes


def test_unmount_of_an_unknown_volume_revokes_nothing_and_succeeds(node):
    assert node.engine().unmount(node.volume_dir("never-mounted")) == "unmounted; nothing to revoke"
    assert node.journal.names() == ["lock", "forget record", "unlock"] and node.vault.tokens_used == []


def test_unmount_without_a_record_revokes_what_the_volumes_metadata_names(node):
    request = node.request()
    node.mount(request)
    node.store.volumes.clear()  # the record was lost or set aside as corrupt
    assert node.engine().unmount(request.mount_dir).startswith("unmounted; token revoked")
    assert not node.vault.alive


def test_unmount_with_vault_down_queues_both_tokens(node):
    request = node.request()
    node.mount(request)
    node.vault.unreachable = True
    message = node.engine().unmount(request.mount_dir)
    assert message.startswith("unmounted; could not revoke the pod token (accessor pod-")
    assert sorted(node.store.pending) == sorted(node.vault.alive) and not node.fs.mounts


@pytest.mark.parametrize("shape", [RECORD_BEFORE_MADE_WITH, RECORD_WITH_MADE_WITH, RECORD_UNWRAPPED,
                                   RECORD_WITH_UNWRAP, RECORD_WITH_IDENTITY])
def test_every_record_shape_reads_and_writes_back_as_it_was(shape):
    record = VolumeRecord.from_json(json.loads(json.dumps(shape)))
    assert record.accessor == "pod-acc" and record.pod_uid == POD_UID and record.policies == ("nginx",)
    # "" (not known) unless the record names them: written before they were kept.
    assert (record.service_account, record.volume_name) == (shape.get("service_account", ""),
                                                            shape.get("volume_name", ""))
    assert record.made_with == (MadeWith(shape["read_only"], shape["fs_group"], shape.get("unwrapped"))
                                if "read_only" in shape else None)
    assert record.to_json() == shape and list(record.to_json()) == list(shape)


def test_a_record_with_fields_of_the_wrong_type_reads_them_as_absent():
    record = VolumeRecord.from_json({"mount_dir": "/x", "accessor": 5, "policies": "nginx", "fs_group": True,
                                     "read_only": "yes"})
    assert record.accessors() == [] and record.policies == () and record.made_with == MadeWith(False, None)


def test_revocation_messages_are_the_ones_operators_read():
    assert str(Revocation(NOTHING)) == "nothing to revoke"
    assert str(Revocation(REVOKED, "a1")) == "token revoked (accessor a1)"
    assert str(Revocation(GONE, "a1")) == "token already gone (accessor a1)"
    queued = Revocation(QUEUED, "a1", "Vault is down")
    assert queued.queued and str(queued) == "could not revoke the pod token (accessor a1) now, queued for retry: " \
                                            "Vault is down"


def test_the_undo_stack_runs_as_exitstack_does():
    """operation.UndoStack stands in for contextlib.ExitStack on the exec path: same order, same exceptions."""
    import contextlib

    from vaulttmpfs.engine.operation import UndoStack

    class Manager:
        def __init__(self, log, name):
            self.log, self.name = log, name

        def __enter__(self):
            self.log.append(f"enter {self.name}")
            return self.name

        def __exit__(self, exc_type, exc, tb):
            self.log.append(f"exit {self.name} {exc_type.__name__ if exc_type else None}")

    def run(stack_class, fail_in_block: bool, fail_in_undo: bool):
        log: list[str] = []

        def undo(exc_type, exc, tb):
            log.append(f"undo {exc_type.__name__ if exc_type else None}")
            if fail_in_undo and exc_type:
                raise OSError("undo failed")

        try:
            with stack_class() as stack:
                log.append(stack.enter_context(Manager(log, "lock")))
                stack.push(undo)
                stack.push(Manager(log, "intent"))
                if fail_in_block:
                    raise ValueError("step failed")
        except Exception as exc:  # noqa: BLE001 -- what leaves the stack is the point
            context = exc.__context__
            log.append(f"raised {type(exc).__name__} {exc} (context: {type(context).__name__ if context else None})")
        return log

    for fail_in_block, fail_in_undo in [(False, False), (True, False), (True, True)]:
        assert run(UndoStack, fail_in_block, fail_in_undo) == run(contextlib.ExitStack, fail_in_block, fail_in_undo)
    assert run(UndoStack, True, True)[-1] == "raised OSError undo failed (context: ValueError)"


def test_a_state_dir_that_cannot_be_written_is_an_os_error_to_every_handler_and_named_to_the_operator(tmp_path):
    import errno

    from vaulttmpfs import telemetry
    from vaulttmpfs.csi import status
    from vaulttmpfs.engine.state import StateStore
    from vaulttmpfs.errors import StateFull, StateUnwritable

    store = StateStore(str(tmp_path / "state"))
    no_space = OSError(errno.ENOSPC, "No space left on device")
    no_writes = OSError(errno.EROFS, "Read-only file system")
    full = store.unwritable("the volume's record", "/s/volumes/k.json", no_space)
    read_only = store.unwritable("the volume's lock", "/s/volumes/k.lock", no_writes)
    assert isinstance(full, StateFull) and isinstance(full, OSError) and full.errno == errno.ENOSPC
    assert str(full) == ("cannot write the volume's record to /s/volumes/k.json: No space left on device; the "
                         f"filesystem of the state dir {tmp_path / 'state'} (VAULTTMPFS_STATE_DIR) is full: free "
                         "space there")
    assert type(read_only) is StateUnwritable and "is on a read-only filesystem" in str(read_only)
    assert store.unwritable("x", "/y", full) is full  # named once, where it happened
    # Counted as the node's disk (as before it had a message); CSI: gRPC's code for a full filesystem.
    assert telemetry.reason(full) == telemetry.reason(read_only) == "os_error"
    assert status.of(full)[0].name == "RESOURCE_EXHAUSTED" and status.of(read_only)[0].name == "INTERNAL"
    assert not status.is_bug(full)
