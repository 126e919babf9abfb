"""Hardening, end to end: who may ask for which policy, whose mount dir it is, which generator
token and which TLS settings the driver accepts, and hostile input of every shape.

The driver is exec'd as the kubelet does, against the session's real OpenBao and real tmpfs.
Every refusal must be one Failure JSON object, exit 1, with nothing mounted, no state left and
not one token minted.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import remember_secret, token_file
from .kubelet import DRIVER, is_mount_point, mount_entry
from .volumes import assert_refused, mounts_under, teardown_ok, write_bindings

NGINX = {"vault/policies": "nginx"}
REPO = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- namespace-bound policies -------------------------------------------------------------------

BINDINGS = {"bindings": [
    {"name": "shop web", "namespaces": ["shop"], "service_accounts": ["web"], "policies": ["nginx"]},
    {"name": "own namespace", "namespaces": ["*"], "policies": ["{namespace}"]},
]}


@pytest.fixture
def bound(kubelet, tmp_path):
    kubelet.env["VAULTTMPFS_POLICY_BINDINGS"] = write_bindings(tmp_path / "bindings.json", BINDINGS)
    return kubelet


def test_a_bound_request_is_mounted(bound):
    reply, path = bound.mount(bound.new_pod("web-1", namespace="shop", service_account="web"), NGINX)
    assert reply.ok, reply.body
    teardown_ok(bound, path)
    # `{namespace}`: a namespace called "other" may have the policy "other"
    reply, path = bound.mount(bound.new_pod("x", namespace="other"), {"vault/policies": "other"})
    assert reply.ok, reply.body
    teardown_ok(bound, path)


@pytest.mark.parametrize("namespace, account, policies, expected", [
    ("payments", "web", "nginx", "policy 'nginx' is not bound to service account 'web' in namespace 'payments'"),
    ("shop", "default", "nginx", "binding #2 'own namespace'"),
    ("shop", "web", "nginx,other", "policy 'other' is not bound"),
])
def test_a_request_outside_the_bindings_fails_naming_the_rule(bound, bao, namespace, account, policies, expected):
    before = len(bao.accessors())
    reply, _ = bound.mount(bound.new_pod(namespace=namespace, service_account=account), {"vault/policies": policies})
    assert_refused(reply, bound, bao, before, expected)
    assert bound.env["VAULTTMPFS_POLICY_BINDINGS"] in reply.message


def test_yaml_bindings_file(kubelet, bao, tmp_path):
    kubelet.env["VAULTTMPFS_POLICY_BINDINGS"] = write_bindings(tmp_path / "bindings.yaml", """\
bindings:
  - namespaces: [shop]
    service_accounts: [web]
    policies: [nginx]
""")
    reply, path = kubelet.mount(kubelet.new_pod(namespace="shop", service_account="web"), NGINX)
    assert reply.ok, reply.body
    teardown_ok(kubelet, path)
    before = len(bao.accessors())
    reply, _ = kubelet.mount(kubelet.new_pod(namespace="shop", service_account="api"), NGINX)
    assert_refused(reply, kubelet, bao, before, "no policy binding")


@pytest.mark.parametrize("mode, uid, content, expected", [
    (0o666, 0, BINDINGS, "chmod 644"),
    (0o644, 1000, BINDINGS, "chown root:root"),
    (0o644, 0, "{not json", "not valid JSON"),
    (0o644, 0, "bindings:\n  - namespaces: *all\n", "line 2"),
    (0o644, 0, {"bindings": [{"namespaces": ["*"], "policies": ["nginx"], "polices": ["x"]}]}, "unknown key"),
])
def test_an_untrusted_or_broken_bindings_file_refuses_every_mount(kubelet, bao, tmp_path, mode, uid, content,
                                                                   expected):
    kubelet.env["VAULTTMPFS_POLICY_BINDINGS"] = write_bindings(tmp_path / "b.json", content, mode, uid)
    before = len(bao.accessors())
    reply, _ = kubelet.mount(kubelet.new_pod(namespace="shop", service_account="web"), NGINX)
    assert_refused(reply, kubelet, bao, before, expected)


def test_two_patterns_that_make_one_name_for_two_namespaces_refuse_every_mount(kubelet, bao, tmp_path):
    """`{namespace}` makes `nginx` namespace nginx's, `ngi{namespace}` namespace nx's: each pattern decides alone,
    and a pod in `nx` was minted `nginx`. Now the file is refused, so every mount is (nx's and nginx's)."""
    kubelet.env["VAULTTMPFS_POLICY_BINDINGS"] = write_bindings(tmp_path / "b.json", {"bindings": [
        {"namespaces": ["*"], "policies": ["{namespace}", "ngi{namespace}"]}]})
    for namespace in ("nx", "nginx"):
        before = len(bao.accessors())
        reply, _ = kubelet.mount(kubelet.new_pod(namespace=namespace), NGINX)
        assert_refused(reply, kubelet, bao, before,
                       "policy patterns '{namespace}' and 'ngi{namespace}' (both in binding #1) overlap")


def test_a_missing_bindings_file_refuses_rather_than_allowing_everything(kubelet, bao, tmp_path):
    kubelet.env["VAULTTMPFS_POLICY_BINDINGS"] = str(tmp_path / "absent.json")
    before = len(bao.accessors())
    reply, _ = kubelet.mount(kubelet.new_pod(), NGINX)
    assert_refused(reply, kubelet, bao, before, "refusing every mount")


def test_without_bindings_any_pod_may_ask_and_the_log_warns(kubelet, log_dir):
    reply, path = kubelet.mount(kubelet.new_pod(namespace="anywhere"), NGINX)
    assert reply.ok, reply.body
    teardown_ok(kubelet, path)
    lines = [json.loads(line) for line in Path(kubelet.env["VAULTTMPFS_LOG_FILE"]).read_text().splitlines()]
    assert any(line["level"] == "warning" and "no VAULTTMPFS_POLICY_BINDINGS" in line["event"] for line in lines)


@pytest.mark.parametrize("typo", ["vault/unwarp", "vault/rol", "vault/polices"])
def test_an_unknown_vault_option_is_refused_by_name(kubelet, bao, typo):
    """FlexVolume ignored a typo'd option (`vault/unwarp: "true"` left the volume wrapped, `vault/rol` put it
    on the default role) where CSI refuses one: now it fails, in CSI's words, before anything is minted."""
    before = len(bao.accessors())
    reply, _ = kubelet.mount(kubelet.new_pod(), {**NGINX, typo: "true"})
    assert_refused(reply, kubelet, bao, before,
                   f"unknown option {typo!r}; vaulttmpfs reads vault/policies, vault/role, vault/unwrap")


def test_options_outside_vault_are_still_not_ours_to_refuse(kubelet):
    reply, path = kubelet.mount(kubelet.new_pod(), {**NGINX, "example.com/owner": "team-a", "vaultish": "x"})
    assert reply.ok, reply.body
    teardown_ok(kubelet, path)


def test_a_spoofed_pod_uid_option_is_refused(bound, bao):
    pod, victim = bound.new_pod(namespace="shop", service_account="web"), bound.new_pod()
    before = len(bao.accessors())
    reply, _ = bound.mount(pod, {**NGINX, "kubernetes.io/pod.uid": victim.uid})
    assert_refused(reply, bound, bao, before, "does not match the pod uid")


def test_the_pod_uid_in_the_token_comes_from_the_kubelets_path(kubelet, bao):
    pod = kubelet.new_pod()
    path = kubelet.volume_dir(pod)
    options = {k: v for k, v in kubelet.options(pod, "token", NGINX).items() if k != "kubernetes.io/pod.uid"}
    reply = kubelet.call("mount", str(path), json.dumps(options))
    assert reply.ok, reply.body
    wrap = json.loads((path / "vault-token.json").read_text())
    remember_secret(wrap["token"])
    assert bao.lookup_accessor(wrap["wrapped_accessor"])["meta"]["pod_uid"] == pod.uid
    teardown_ok(kubelet, path)


def test_admission_policy_for_spoofed_options_is_valid_kubernetes():
    # The namespace cannot be checked on the node (the pod's options may override it): the cluster
    # side closes that with this policy. It must at least be a valid object for current Kubernetes.
    import yaml
    from kubernetes_validate import validate

    docs = list(yaml.safe_load_all((REPO / "policies/vaulttmpfs-pod-options.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    for doc in docs:
        validate(doc, "1.30.0", strict=True)
    expression = docs[0]["spec"]["validations"][0]["expression"]
    assert "cloudwatt/vaulttmpfs" in expression and "vault/policies" in expression


def test_the_admission_policy_allows_exactly_the_options_vaulttmpfs_reads():
    """It denied `vault/unwrap`, which pods.md documents: its list of keys must be the driver's. Read from the
    CEL text (no CEL evaluator is a dependency): the one `k in [...]` every option key is held to."""
    import yaml

    from vaulttmpfs.engine import attributes

    validation = next(yaml.safe_load_all((REPO / "policies/vaulttmpfs-pod-options.yaml").read_text()))[
        "spec"]["validations"][0]
    lists = re.findall(r"v\.flexVolume\.options\.all\(k,\s*k in \[([^\]]*)\]\)", validation["expression"])
    assert len(lists) == 1, validation["expression"]
    assert re.fullmatch(r"\s*'[^']+'(\s*,\s*'[^']+')*\s*", lists[0]), lists[0]  # only quoted keys
    assert sorted(re.findall(r"'([^']+)'", lists[0])) == sorted(attributes.KNOWN)
    assert all(key in validation["message"] for key in attributes.KNOWN), validation["message"]


# --- generator token and TLS settings -------------------------------------------------------------

def test_a_root_generator_token_is_refused(kubelet, bao, tmp_path, generator):
    root_token = bao.create_token(policies=["root"], ttl="10m")["client_token"]
    kubelet.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] = token_file(tmp_path, root_token)
    before = len(bao.accessors())
    reply, _ = kubelet.mount(kubelet.new_pod(), NGINX)
    assert_refused(reply, kubelet, bao, before, "carries the root policy")
    assert "vaulttmpfs bootstrap" in reply.message
    bao.revoke_token(root_token)
    # the check is cached per token: the node's proper token is checked afresh and accepted
    kubelet.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] = generator["path"]
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    teardown_ok(kubelet, path)


def test_skip_verify_is_refused_unless_insecure_is_allowed(kubelet, bao):
    kubelet.env["VAULT_SKIP_VERIFY"] = "true"
    before = len(bao.accessors())
    reply, _ = kubelet.mount(kubelet.new_pod(), NGINX)
    assert_refused(reply, kubelet, bao, before, "VAULTTMPFS_ALLOW_INSECURE=true")
    assert "VAULT_CACERT" in reply.message
    kubelet.env["VAULTTMPFS_ALLOW_INSECURE"] = "true"
    reply, path = kubelet.mount(kubelet.new_pod(), NGINX)
    assert reply.ok, reply.body
    teardown_ok(kubelet, path)


# --- the mount dir --------------------------------------------------------------------------------

def _pod_dir(kubelet, uid: str, plugin: str = DRIVER, name: str = "token") -> Path:
    path = kubelet.root / "var/lib/kubelet/pods" / uid / "volumes" / plugin / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_mount_dirs_outside_the_kubelet_layout_are_refused(kubelet, bao, tmp_path):
    pod = kubelet.new_pod()
    outside = tmp_path / "elsewhere" / pod.uid / "volumes" / DRIVER / "token"
    outside.mkdir(parents=True)
    real = _pod_dir(kubelet, pod.uid)
    uid_link = kubelet.root / "var/lib/kubelet/pods" / "linked-uid"
    uid_link.symlink_to(real.parent.parent.parent)  # pods/linked-uid -> pods/<uid>
    leaf_link = _pod_dir(kubelet, pod.uid, name="x").parent / "leaf"
    leaf_link.symlink_to(real)
    (tmp_path / "hop-target" / "a" / "b").mkdir(parents=True)
    (tmp_path / "hop-target" / DRIVER / "token").mkdir(parents=True)
    (real.parent / "hop").symlink_to(tmp_path / "hop-target" / "a" / "b")
    cases = {
        str(outside): "is not a pod volume dir",
        str(_pod_dir(kubelet, pod.uid, plugin="other~plugin")): "is not a pod volume dir",
        str(_pod_dir(kubelet, pod.uid, name="deeper") / "still"): "does not exist",
        str(uid_link / "volumes" / DRIVER / "token"): "is not a pod volume dir",
        str(leaf_link): "is a symlink",
        str(kubelet.root / "var/lib/kubelet/pods" / pod.uid / "volumes" / DRIVER / ".." / DRIVER): "not a pod",
        # reads like pods/<uid>/volumes/<driver>/token, but `hop` is a symlink out of the pods dir
        str(kubelet.root / "var/lib/kubelet/pods" / pod.uid / "volumes" / DRIVER / "hop" / ".." / ".." / DRIVER
            / "token"): "is not a pod volume dir",
        str(kubelet.root / "var/lib/kubelet/pods"): "is not a pod volume dir",
        "relative/dir": "not an absolute path",
    }
    (_pod_dir(kubelet, pod.uid, name="deeper") / "too-deep").mkdir()
    cases[str(_pod_dir(kubelet, pod.uid, name="deeper") / "too-deep")] = "is not a pod volume dir"
    before = len(bao.accessors())
    for path, expected in cases.items():
        options = json.dumps(kubelet.options(pod, "token", NGINX))
        assert_refused(kubelet.call("mount", path, options), kubelet, bao, before, expected)


def test_a_kubelet_root_behind_a_symlink_is_fine(kubelet, tmp_path):
    # e.g. /var/lib/kubelet -> /data/kubelet: the pods dir may be a symlink, nothing below it may
    link = tmp_path / "kubelet-link"
    link.symlink_to(kubelet.root / "var/lib/kubelet")
    kubelet.env["VAULTTMPFS_PODS_DIR"] = str(link / "pods")
    pod = kubelet.new_pod()
    path = kubelet.volume_dir(pod)
    reply = kubelet.call("mount", str(path), json.dumps(kubelet.options(pod, "token", NGINX)))
    assert reply.ok, reply.body
    teardown_ok(kubelet, path)


def test_a_foreign_mount_is_neither_hidden_nor_touched(kubelet, bao):
    pod = kubelet.new_pod()
    path = kubelet.volume_dir(pod)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "someone-else", str(path)], check=True)
    try:
        (path / "their-file").write_text("keep me")
        before = len(bao.accessors())
        reply = kubelet.call("mount", str(path), json.dumps(kubelet.options(pod, "token", NGINX)))
        assert reply.status == "Failure" and reply.exit_code == 1 and "does not own" in reply.message
        assert len(bao.accessors()) == before
        assert mount_entry(path)["source"] == "someone-else"
        assert len([m for m in mounts_under(kubelet.root) if m == str(path)]) == 1  # not stacked over
        assert (path / "their-file").read_text() == "keep me"
        reply = kubelet.unmount(path)
        assert reply.status == "Failure" and "does not own" in reply.message
        assert mount_entry(path)["source"] == "someone-else"
    finally:
        subprocess.run(["umount", str(path)], check=False)


# --- hostile input, generated -------------------------------------------------------------------

_junk_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _junk_text,
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_junk_text, inner, max_size=3),
                            max_leaves=6)
_bad_names = st.one_of(
    st.just(""), st.just(".."), st.just("../root"), st.just("a/b"), st.just("/"), st.just(" "),
    st.text(st.characters(min_codepoint=0x80, blacklist_categories=("Cs",)), min_size=1, max_size=8),
    st.from_regex(r"[A-Za-z0-9]{0,5}[/\\ ,:*?\x00\n][A-Za-z0-9.]{0,5}", fullmatch=True),
    st.from_regex(r"[a-z]{129,140}", fullmatch=True),
)
_allowed = st.lists(st.sampled_from(["nginx", "other"]), max_size=2)


@st.composite
def hostile_options(draw) -> str:
    """An options argument with at least one certain defect."""
    kind = draw(st.sampled_from(["not-object", "non-string", "huge", "bad-policy", "bad-role", "no-policy",
                                 "disallowed-policy"]))
    base = {"kubernetes.io/fsType": "tmpfs", "vault/policies": "nginx"}
    if kind == "not-object":
        return json.dumps(draw(_json_values.filter(lambda v: not isinstance(v, dict))))
    if kind == "non-string":
        value = draw(st.none() | st.booleans() | st.integers() | st.lists(st.text(max_size=3), max_size=2)
                     | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
        return json.dumps({**base, draw(st.sampled_from(["vault/policies", "vault/role", "kubernetes.io/pod.uid",
                                                         "x"])): value})
    if kind == "huge":
        size = draw(st.integers(64 * 1024 + 1, 120 * 1024))
        return json.dumps({**base, draw(st.sampled_from(["vault/policies", "padding"])): "n" * size})
    if kind == "bad-policy":
        names = draw(_allowed) + [draw(_bad_names)] + draw(_allowed)
        return json.dumps({**base, "vault/policies": ",".join(draw(st.permutations(names)))})
    if kind == "bad-role":
        return json.dumps({**base, "vault/role": draw(_bad_names.filter(bool))})
    if kind == "no-policy":
        options = {k: v for k, v in base.items() if k != "vault/policies"}
        return json.dumps(draw(st.sampled_from([options, {**options, "vault/policies": ""},
                                                 {**options, "vault/policies": " , ,"}])))
    # syntactically fine names the token role does not allow (Vault refuses: still nothing minted)
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)
                          .filter(lambda n: n not in {"nginx", "other", "default"}), min_size=1, max_size=3))
    return json.dumps({**base, "vault/policies": ",".join(names + draw(_allowed))})


@FUZZ
@given(options=hostile_options())
def test_hostile_options_fail_cleanly(kubelet, bao, options):
    before = len(bao.accessors())
    path = kubelet.volume_dir(kubelet.new_pod())
    reply = kubelet.call("mount", str(path), options)
    assert_refused(reply, kubelet, bao, before)
    assert not is_mount_point(path)


@FUZZ
@given(data=st.data())
def test_hostile_argv_and_settings_fail_cleanly(kubelet, bao, data):
    before = len(bao.accessors())
    pod = kubelet.new_pod()
    path = kubelet.volume_dir(pod)
    options = json.dumps(kubelet.options(pod, "token", NGINX))
    kind = data.draw(st.sampled_from(["argc", "dir", "setting", "bytes"]))
    env = None
    if kind == "argc":
        args = data.draw(st.lists(st.sampled_from([str(path), options, "x", ""]), max_size=6)
                         .filter(lambda a: len(a) not in (2, 3)))
        argv = ["mount", *args]
    elif kind == "dir":
        bad = data.draw(st.sampled_from(["", ".", "relative", "/", "/proc/self", str(kubelet.root),
                                         str(path / "missing"), str(path) + "\n", str(path / "..")])
                        | _junk_text.filter(lambda t: "\x00" not in t))
        argv = ["mount", bad, options]
    elif kind == "setting":
        name = data.draw(st.sampled_from(["VAULTTMPFS_ROLE_NAME", "VAULTTMPFS_TOKEN_FILENAME"]))
        env = {**kubelet.env, name: data.draw(_bad_names.filter(lambda v: bool(v.strip()) and "\x00" not in v))}
        argv = ["mount", str(path), options]
    else:  # options that are not UTF-8 at all
        junk = data.draw(st.binary(min_size=1, max_size=64).filter(lambda b: b"nginx" not in b and b"\x00" not in b))
        argv = ["mount", str(path), b'{"vault/policies":"' + junk + b'"}']
    reply = kubelet.call(*argv, env=env)
    assert_refused(reply, kubelet, bao, before)
    assert not is_mount_point(path)


def _logged(kubelet) -> list[dict]:
    log = Path(kubelet.env["VAULTTMPFS_LOG_FILE"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_deeply_nested_options_are_a_bad_call_and_still_logged(kubelet, bao):
    """json's parser recurses per level: 2000 `[` were `internal error: RecursionError` with a traceback
    logged, and the call's outcome line was lost (the log re-parsed the options and raised)."""
    before, logged = len(bao.accessors()), len(_logged(kubelet))
    path = kubelet.volume_dir(kubelet.new_pod())
    reply = kubelet.call("mount", str(path), "[" * 2000)
    assert_refused(reply, kubelet, bao, before, "options are not valid JSON: nested too deeply")
    new = _logged(kubelet)[logged:]
    assert [line["event"] for line in new] == ["driver call"], new
    assert new[0]["dir"] == str(path) and new[0]["result"] == "Failure" and "nested too deeply" in new[0]["error"]


@pytest.mark.parametrize("fs_group", ["\u00b2", "\u0661\u0660\u0660\u0660", "\uff11", "9" * 5000, "+1000", " 1000",
                                      "1_000", "-1", "2147483648"])
def test_an_fs_group_that_is_not_ascii_digits_is_refused_by_name(kubelet, bao, fs_group):
    """str.isdigit() took "²" (int() then raised: internal error) and Arabic-Indic "١٠٠٠" (gid 1000)."""
    before = len(bao.accessors())
    pod = kubelet.new_pod()
    path = kubelet.volume_dir(pod)
    options = {**kubelet.options(pod, "token", NGINX), "kubernetes.io/mounterArgs.FsGroup": fs_group}
    reply = kubelet.call("mount", str(path), json.dumps(options))
    assert_refused(reply, kubelet, bao, before, "option 'kubernetes.io/mounterArgs.FsGroup' must be a group id")
    assert not is_mount_point(path)
