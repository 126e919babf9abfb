"""vaulttmpfs.bindings on its own: the matching rules (no pattern lets one namespace claim another's
policies), the file checks (every directory up to /, like sshd), and the strict PyYAML loader, checked
against the hand-written YAML subset it replaced (tests/old_yaml_subset.py): every document the old
subset accepted reads the same."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vaulttmpfs.config import is_safe_name
from vaulttmpfs.engine import bindings
from vaulttmpfs.errors import DriverError

from .old_yaml_subset import parse_yaml_subset

RULES = {"bindings": [
    {"name": "shop apps", "namespaces": ["shop", "team-*"], "service_accounts": ["*"],
     "policies": ["{namespace}.*", "common"]},
    {"namespaces": ["payments"], "service_accounts": ["api"], "policies": ["payments-{service_account}"]},
    {"service_accounts": ["backup"], "policies": ["backup-reader"]},
]}


def rules() -> bindings.Bindings:
    return bindings.parse(json.dumps(RULES), "/etc/vaulttmpfs/bindings.json")


@pytest.mark.parametrize("namespace, account, policies, rule", [
    ("shop", "web", ["shop.db", "common"], "binding #1"),
    ("team-a", "default", ["team-a.cache"], "binding #1"),
    ("payments", "api", ["payments-api"], "binding #2"),
    ("anything", "backup", ["backup-reader"], "binding #3"),
    ("shop", "backup", ["shop.x", "backup-reader"], "binding #1, binding #3"),
])
def test_requests_inside_a_binding_are_allowed(namespace, account, policies, rule):
    assert bindings.check(rules(), namespace, account, policies) == rule


@pytest.mark.parametrize("namespace, account, policies, expected", [
    # another namespace's policies: the namespace-hopping escalation this closes
    ("shop", "web", ["payments-api"],
     "policy 'payments-api' is not bound to service account 'web' in namespace 'shop'"),
    ("team-a", "web", ["shop.db"], "binding #1 'shop apps'"),
    ("payments", "web", ["payments-web"], "no policy binding in /etc/vaulttmpfs/bindings.json covers"),
    ("payments", "api", ["payments-api", "common"], "policy 'common' is not bound"),
    ("default", "default", ["common"], "no policy binding"),
])
def test_requests_outside_the_bindings_name_the_rule(namespace, account, policies, expected):
    with pytest.raises(DriverError) as refused:
        bindings.check(rules(), namespace, account, policies)
    assert expected in str(refused.value)
    assert "nothing was mounted" in str(refused.value)


@pytest.mark.parametrize("namespace, account", [
    ("", "web"), ("shop", ""), ("*", "web"), ("sh*p", "web"), ("Shop", "web"), ("shop", "w*"),
    ("shop/../payments", "web"), ("a" * 64, "web"),
])
def test_a_namespace_or_account_that_is_not_a_kubernetes_name_is_refused(namespace, account):
    # A `*` smuggled in through a spoofed option must not widen `{namespace}.*`.
    with pytest.raises(DriverError, match="missing or"):
        bindings.check(rules(), namespace, account, ["common"])


@pytest.mark.parametrize("policy", ["shop.d/b", "shop.db\n", "shop.é", ""])
def test_a_policy_that_is_not_a_policy_name_is_refused(policy):
    # The file-wide overlap check reads `*` as policy-name characters only ([A-Za-z0-9._-]): so must `check`.
    with pytest.raises(DriverError, match="is not a policy name"):
        bindings.check(rules(), "shop", "web", [policy])


@given(namespace=st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True),
       other=st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
       suffix=st.from_regex(r"[A-Za-z0-9._-]{0,12}", fullmatch=True))
def test_namespace_placeholder_only_ever_matches_the_pods_own_namespace(namespace, other, suffix):
    doc = bindings.parse(json.dumps({"bindings": [{"namespaces": ["*"], "policies": ["{namespace}.*"]}]}))
    assert bindings.check(doc, namespace, "default", [f"{namespace}.{suffix}"])
    if other != namespace:
        with pytest.raises(DriverError):
            bindings.check(doc, namespace, "default", [f"{other}.{suffix}"])


@pytest.mark.parametrize("document, expected", [
    ([], "exactly one key"),
    ({"bindings": {}}, "exactly one key"),
    ({"bindings": [], "extra": 1}, "exactly one key"),
    ({"bindings": ["x"]}, "binding #1 is not an object"),
    ({"bindings": [{"policies": ["a"]}]}, "names neither"),
    ({"bindings": [{"namespaces": ["a"]}]}, '"policies" must be a non-empty list'),
    ({"bindings": [{"namespaces": ["a"], "policies": []}]}, '"policies" must be a non-empty list'),
    ({"bindings": [{"namespaces": "a", "policies": ["a"]}]}, '"namespaces" must be a non-empty list'),
    ({"bindings": [{"namespaces": ["a"], "policies": [1]}]}, "non-empty list of strings"),
    ({"bindings": [{"namespaces": ["a/b"], "policies": ["a"]}]}, "invalid pattern 'a/b'"),
    ({"bindings": [{"namespaces": ["{namespace}"], "policies": ["a"]}]}, "invalid pattern"),
    ({"bindings": [{"namespaces": ["a"], "policies": ["{pod}-x"]}]}, "invalid pattern '{pod}-x'"),
    ({"bindings": [{"namespaces": ["a"], "policies": ["../root"]}]}, "invalid pattern"),
    ({"bindings": [{"namespaces": ["a"], "policy": ["x"]}]}, "unknown key 'policy'"),
    ({"bindings": [{"namespaces": ["a"], "policies": ["x"], "name": 3}]}, '"name" must be a string'),
])
def test_malformed_documents_are_refused_with_the_place(document, expected):
    with pytest.raises(DriverError) as refused:
        bindings.parse(json.dumps(document), "b.json")
    assert expected in str(refused.value)


def test_duplicate_json_keys_are_refused():
    with pytest.raises(DriverError, match="duplicate key 'policies'"):
        bindings.parse('{"bindings": [{"namespaces": ["a"], "policies": ["x"], "policies": ["root"]}]}')


# --- the file ---------------------------------------------------------------------------------

def write(path, text: str, mode: int = 0o644, uid: int = 0):
    """A bindings file as written a minute ago: one just written is read only once it has stood still."""
    path.write_text(text)
    os.chown(path, uid, 0)
    path.chmod(mode)
    os.utime(path, (time.time() - 60, time.time() - 60))
    return str(path)


def test_a_root_owned_file_is_loaded(tmp_path):
    loaded = bindings.load(write(tmp_path / "b.json", json.dumps(RULES)))
    assert [b.number for b in loaded.rules] == [1, 2, 3]
    assert loaded.source == str(tmp_path / "b.json")


@pytest.mark.parametrize("mode, uid, expected", [
    (0o664, 0, "chmod 644"), (0o646, 0, "chmod 644"), (0o644, 1000, "chown root:root"),
])
def test_a_file_others_can_change_is_refused_with_the_fix(tmp_path, mode, uid, expected):
    path = write(tmp_path / "b.json", json.dumps(RULES), mode, uid)
    with pytest.raises(DriverError) as refused:
        bindings.load(path)
    assert "must be owned by root and not group/world-writable" in str(refused.value)
    assert expected in str(refused.value)


def test_a_writable_directory_is_refused(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(DriverError, match=f"chmod go-w {folder}"):
        bindings.load(write(folder / "b.json", json.dumps(RULES)))


@pytest.mark.parametrize("opened", ["grandparent", "great-grandparent"])
def test_a_directory_others_can_change_anywhere_above_is_refused(tmp_path, opened):
    """A world-writable grandparent let its owner swap the bindings dir for one with a permissive file."""
    folder = tmp_path / "a" / "b" / "etc-vaulttmpfs"
    folder.mkdir(parents=True)
    loose = folder.parent if opened == "grandparent" else folder.parent.parent
    loose.chmod(0o777)
    path = write(folder / "b.json", json.dumps(RULES))
    with pytest.raises(DriverError, match=f"directory {loose} is not trusted.*chmod go-w {loose}"):
        bindings.load(path)
    os.chown(loose, 1000, 1000)  # not writable by others, but not root's either
    loose.chmod(0o755)
    with pytest.raises(DriverError, match=f"directory {loose} is not trusted.*chown root {loose}"):
        bindings.load(path)
    os.chown(loose, 0, 0)
    assert len(bindings.load(path).rules) == 3
    loose.chmod(0o1777)  # root-owned and sticky above the file's own dir, like /tmp: others cannot swap it
    assert len(bindings.load(path).rules) == 3


def test_a_symlink_in_a_directory_others_can_change_is_refused(tmp_path):
    target = write(tmp_path / "b.json", json.dumps(RULES))
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    (loose / "b.json").symlink_to(target)  # its owner could point it at any root-owned file
    with pytest.raises(DriverError, match=f"directory {loose} is not trusted"):
        bindings.load(str(loose / "b.json"))


def test_missing_fifo_huge_and_binary_files_are_refused(tmp_path):
    with pytest.raises(DriverError, match="refusing every mount"):
        bindings.load(str(tmp_path / "absent.json"))
    os.mkfifo(tmp_path / "fifo")  # must not block the driver
    with pytest.raises(DriverError, match="not a regular file"):
        bindings.load(str(tmp_path / "fifo"))
    with pytest.raises(DriverError, match="larger than"):
        bindings.load(write(tmp_path / "big.json", " " * (bindings.MAX_BYTES + 1)))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DriverError, match="not UTF-8"):
        bindings.load(str(tmp_path / "bin.json"))


# --- a file read while it is being rewritten ------------------------------------------------------------

REWRITTEN = """\
bindings:
  - name: payments api only
    namespaces: [payments]
    policies: [payments.db-admin]
    service_accounts: [api]
  - name: team-a
    policies:
      - "{namespace}.*"
    namespaces:
      - team-a
"""


def _rewrite_in_place(path: str, pieces: list[str], pause: float, first_written: threading.Event, last: list):
    """As `cat >`, an editor saving over the file or open(path, "w") do: truncate, then write, here in pieces."""
    with open(path, "w") as handle:
        for n, piece in enumerate(pieces):
            if n:
                time.sleep(pause)
            handle.write(piece)
            handle.flush()
            last.append(time.time())
            first_written.set()


@pytest.mark.parametrize("cut, request_", [
    # the auditor's: without its last line, the first binding leaves service_accounts out, which is ["*"]
    (REWRITTEN.index("    service_accounts: [api]"), ("payments", "web", "payments.db-admin")),
    # cut mid-line, `team-a` reads `team`
    (len(REWRITTEN) - len("-a\n"), ("team", "default", "team.x")),
])
def test_a_file_rewritten_in_place_is_read_only_once_it_is_whole(tmp_path, cut, request_):
    # What a mount reading it in the middle saw: a valid file granting what the whole one refuses.
    assert bindings.check(bindings.parse(REWRITTEN[:cut]), *request_[:2], [request_[2]])
    with pytest.raises(DriverError):
        bindings.check(bindings.parse(REWRITTEN), *request_[:2], [request_[2]])
    path = write(tmp_path / "b.yaml", "bindings: []\n")
    first_written, last = threading.Event(), []
    writer = threading.Thread(target=_rewrite_in_place,
                              args=(path, [REWRITTEN[:cut], REWRITTEN[cut:]], 0.4, first_written, last))
    writer.start()
    try:
        first_written.wait(5)
        loaded = bindings.load(path)  # while the writer pauses with half the file written
        read_at = time.time()
    finally:
        writer.join()
    with pytest.raises(DriverError, match="is not bound|no policy binding"):
        bindings.check(loaded, *request_[:2], [request_[2]])
    assert bindings.check(loaded, "payments", "api", ["payments.db-admin"])
    assert read_at - last[-1] >= bindings.SETTLE_SECONDS - 0.05  # read once it had stood still that long


def test_a_file_that_never_stands_still_refuses_the_mount(tmp_path, monkeypatch):
    monkeypatch.setattr(bindings, "SETTLE_DEADLINE", 1.5, raising=False)
    path = write(tmp_path / "b.json", json.dumps(RULES))
    first_written, last = threading.Event(), []
    # JSON with more and more trailing blanks: valid all along, never still
    writer = threading.Thread(target=_rewrite_in_place,
                              args=(path, [json.dumps(RULES)] + [" "] * 30, 0.1, first_written, last))
    writer.start()
    try:
        first_written.wait(5)
        started = time.monotonic()
        with pytest.raises(DriverError) as refused:
            bindings.load(path)
        assert time.monotonic() - started < 2.5
    finally:
        writer.join()
    assert f"policy bindings {path} was still being written 1.5 s after this mount first read it" in str(refused.value)
    assert "replace it atomically (write a temporary file in the same directory, then rename it over" in str(
        refused.value)


def test_a_file_that_stood_still_is_read_at_once_and_an_atomic_replace_is_read_whole(tmp_path):
    path = write(tmp_path / "b.json", json.dumps(RULES))  # written a minute ago
    started = time.monotonic()
    assert len(bindings.load(path).rules) == 3
    assert time.monotonic() - started < 0.5
    # the way to change it: a complete temporary file renamed over it
    temporary = write(tmp_path / "b.json.new", json.dumps({"bindings": RULES["bindings"][:1]}))
    os.replace(temporary, path)
    started = time.monotonic()
    assert len(bindings.load(path).rules) == 1
    assert time.monotonic() - started < 0.5


# --- adversarial namespace pairs ------------------------------------------------------------------

# Pairs where one name is a prefix of the other followed by a character names may contain.
PAIRS = [("team-a", "team-a-b"), ("a", "a-b"), ("team", "team-a"), ("a-b", "a-b-c"), ("web", "web-1")]


@pytest.mark.parametrize("pattern, fixed", [
    ("{namespace}-*", "{namespace}.*"), ("{namespace}-db", "{namespace}.db"), ("{namespace}*", "{namespace}.*"),
    ("{namespace}-{service_account}", "{namespace}.{service_account}"),
    ("{namespace}.{service_account}-*", "{namespace}.{service_account}_*"),
    ("{service_account}.db", "{service_account}_db"),
])
def test_a_pattern_that_could_cross_namespaces_is_refused_with_a_safe_spelling(pattern, fixed):
    with pytest.raises(DriverError) as refused:
        bindings.parse(json.dumps({"bindings": [{"namespaces": ["*"], "policies": [pattern]}]}), "b.json")
    assert "lets one pod claim another's policies" in str(refused.value)
    assert repr(fixed) in str(refused.value)
    bindings.parse(json.dumps({"bindings": [{"namespaces": ["*"], "policies": [fixed]}]}), "b.json")


@pytest.mark.parametrize("mine, theirs", PAIRS)
def test_the_old_readme_example_can_no_longer_hand_out_another_namespaces_policy(mine, theirs):
    """The README once showed `{namespace}-*`: a pod in team-a got team-a-b's `team-a-b-db`."""
    old_example = {"bindings": [{"namespaces": ["*"], "policies": ["{namespace}-*"]}]}
    with pytest.raises(DriverError, match="lets one pod claim another's policies"):
        bindings.check(bindings.parse(json.dumps(old_example), "b.json"), mine, "default", [f"{theirs}-db"])


@pytest.mark.parametrize("pattern", ["*{namespace}", "*.{namespace}", "x*_{service_account}"])
def test_a_wildcard_before_a_placeholder_is_refused(pattern):
    with pytest.raises(DriverError, match="put .* before any `\\*`"):
        bindings.parse(json.dumps({"bindings": [{"namespaces": ["*"], "policies": [pattern]}]}), "b.json")


@pytest.mark.parametrize("mine, theirs", PAIRS + [(b, a) for a, b in PAIRS])
@pytest.mark.parametrize("pattern, policy", [
    ("{namespace}.*", "{ns}.db"), ("{namespace}_*", "{ns}_db"), ("{namespace}", "{ns}"),
    ("{namespace}.{service_account}", "{ns}.default"), ("{namespace}_{service_account}_*", "{ns}_default_x"),
    ("app.{namespace}.*", "app.{ns}.db"),
])
def test_no_allowed_pattern_gives_a_pod_another_namespaces_policy(mine, theirs, pattern, policy):
    doc = bindings.parse(json.dumps({"bindings": [{"namespaces": ["*"], "policies": [pattern]}]}), "b.json")
    assert bindings.check(doc, theirs, "default", [policy.format(ns=theirs)])  # theirs may
    with pytest.raises(DriverError, match="is not bound"):
        bindings.check(doc, mine, "default", [policy.format(ns=theirs)])  # mine may not


_names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?", fullmatch=True)
_accounts = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,5}[a-z0-9])?(\.[a-z0-9]{1,3})?", fullmatch=True)
_pieces = st.sampled_from(["{namespace}", "{service_account}", "*", ".", "_", "-", "db", "x."])


@settings(max_examples=300, deadline=None)
@given(pattern=st.lists(_pieces, min_size=1, max_size=5).map("".join), first=st.tuples(_names, _accounts),
       second=st.tuples(_names, _accounts), filler=st.from_regex(r"[a-z0-9._-]{0,6}", fullmatch=True))
def test_whatever_pattern_is_accepted_no_two_identities_share_a_policy(pattern, first, second, filler):
    """Any accepted pattern: a policy name it gives one pod is given to another pod only when they
    agree on every placeholder the pattern uses."""
    try:
        doc = bindings.parse(json.dumps({"bindings": [{"namespaces": ["*"], "policies": [pattern]}]}))
    except DriverError:
        return  # refusing a pattern is always allowed
    policy = (pattern.replace("{namespace}", first[0]).replace("{service_account}", first[1])
              .replace("*", filler))
    if not bindings._POLICY_PATTERN.fullmatch(policy):
        return
    assert bindings.check(doc, first[0], first[1], [policy])
    differs = ("{namespace}" in pattern and first[0] != second[0]) or (
        "{service_account}" in pattern and first[1] != second[1])
    if differs:
        with pytest.raises(DriverError):
            bindings.check(doc, second[0], second[1], [policy])


# --- across the whole file: two patterns may not hand one name to two identities ------------------------

def _file(*entries) -> str:
    return json.dumps({"bindings": list(entries)})


def _advice(message: str) -> str:
    return re.search(r"e\.g\. '([^']*)'$", message).group(1)


# (the file, the two patterns named, a pod the file would have given another's policy, that policy)
OVERLAPS = [
    # the auditor's: namespace `app` got `app.shop.db`, which the second pattern makes namespace shop's
    ([{"namespaces": ["*"], "policies": ["{namespace}.*", "app.{namespace}.*"]}],
     ("{namespace}.*", "app.{namespace}.*"), ("app", "default"), "app.shop.db"),
    # the spelling the single-pattern refusal suggests, next to the usual one: SA `shop.web` in `dev` got
    # `shop.web_db`, a `shop.*` policy
    ([{"namespaces": ["*"], "policies": ["{namespace}.*"]},
      {"namespaces": ["*"], "service_accounts": ["*"], "policies": ["{service_account}_db"]}],
     ("{namespace}.*", "{service_account}_db"), ("dev", "shop.web"), "shop.web_db"),
    # the odd one first
    ([{"namespaces": ["*"], "policies": ["app.{namespace}.*"]}, {"namespaces": ["*"], "policies": ["{namespace}.*"]}],
     ("app.{namespace}.*", "{namespace}.*"), ("app", "default"), "app.shop.db"),
    # the documented `payments-{service_account}`, once its binding and `{namespace}.*`'s meet: service account
    # `web.x` of payments gets `payments-web.x`, namespace `payments-web`'s by the first
    ([{"namespaces": ["*"], "policies": ["{namespace}.*"]},
      {"namespaces": ["payments"], "policies": ["payments-{service_account}"]}],
     ("{namespace}.*", "payments-{service_account}"), ("payments", "web.x"), "payments-web.x"),
    # within one namespace: every service account of shop gets what names service account web's own
    ([{"namespaces": ["*"], "service_accounts": ["admin"], "policies": ["{namespace}.*"]},
      {"namespaces": ["*"], "policies": ["{namespace}.{service_account}"]}],
     ("{namespace}.*", "{namespace}.{service_account}"), ("shop", "admin"), "shop.web"),
    # literal text before a placeholder, the namespace lists narrowed but still meeting (team-a / am-a)
    ([{"namespaces": ["team-*"], "policies": ["{namespace}.*"]},
      {"namespaces": ["a*"], "policies": ["te{namespace}.x"]}],
     ("{namespace}.*", "te{namespace}.x"), ("am-a", "default"), "team-a.x"),
]


@pytest.mark.parametrize("entries, patterns, pod, policy", OVERLAPS)
def test_two_patterns_that_can_give_one_name_to_two_identities_refuse_the_file(entries, patterns, pod, policy,
                                                                               monkeypatch):
    # Each is a real hole: taken pattern by pattern (as before), the file gives `pod` a policy that one of the
    # two patterns makes another identity's.
    with monkeypatch.context() as before:
        before.setattr(bindings, "_require_no_overlap", lambda rules, source: None, raising=False)
        assert bindings.check(bindings.parse(_file(*entries), "b.json"), *pod, [policy])
    readings = [_read(p, policy) for p in patterns]
    assert any(r is not None and any(dict(zip(("{namespace}", "{service_account}"), pod, strict=True))[k] != v
                                     for k, v in r.items()) for r in readings), readings
    with pytest.raises(DriverError) as refused:
        bindings.parse(_file(*entries), "b.json")
    message = str(refused.value)
    assert f"policy patterns {patterns[0]!r} and {patterns[1]!r}" in message and "overlap" in message
    assert "lets one pod claim another's policies" in message
    # an example name both produce, and whose each makes it
    shared = re.search(r"another's policies: '([^']*)' matches both", message).group(1)
    assert all(bindings._match(p, shared, {"{namespace}": ns, "{service_account}": sa})
               for p, (ns, sa) in zip(patterns, _identities(message), strict=True))
    # the advice is a spelling the whole file accepts, the target pattern replaced by it
    advice, target = _advice(message), re.search(r"respell '([^']*)'", message).group(1)
    fixed = [{**e, "policies": [advice if p == target else p for p in e["policies"]]} for e in entries]
    assert len(bindings.parse(_file(*fixed), "b.json").rules) == len(entries)


def _identities(message: str) -> list[tuple[str, str]]:
    """The two identities a refusal names: (namespace, service account), '' where the pattern leaves it free."""
    found = []
    for owner in re.findall(r"the (?:first giving it|second) to (.*?)(?:,|\. Across)", message):
        ns = re.search(r"namespace '([^']*)'", owner)
        sa = re.search(r"service account '([^']*)'", owner)
        found.append((ns.group(1) if ns else "", sa.group(1) if sa else ""))
    return found


@pytest.mark.parametrize("entries, allowed", [
    # the same reading of the identity: `shop.db` is namespace shop's by both
    ([{"namespaces": ["*"], "policies": ["{namespace}.*"]}, {"namespaces": ["shop"], "policies": ["{namespace}.db"]}],
     [("shop", "web", "shop.db")]),
    # different separators after the namespace: `shop.x` and `shop_web_x` can never be the same name
    ([{"namespaces": ["*"], "policies": ["{namespace}.*", "{namespace}_{service_account}_*"]}],
     [("shop", "web", "shop.x"), ("shop", "web", "shop_web_x")]),
    ([{"namespaces": ["*"], "policies": ["{namespace}.*", "{namespace}_{service_account}"]}],
     [("shop", "web.v1", "shop_web.v1")]),
    # different text before the placeholder
    ([{"namespaces": ["*"], "policies": ["app.{namespace}.*", "web.{namespace}.*"]}], [("shop", "x", "web.shop.db")]),
    # bindings whose pods cannot produce the same names: service accounts db-* make `db-...`, never `team-...`
    ([{"namespaces": ["team-*"], "policies": ["{namespace}.*"]},
      {"namespaces": ["*"], "service_accounts": ["db-*"], "policies": ["{service_account}_db"]}],
     [("team-a", "web", "team-a.x"), ("shop", "db-main.v2", "db-main.v2_db")]),
    # the documented example, unchanged
    (RULES["bindings"], [("payments", "api", "payments-api"), ("shop", "web", "shop.db")]),
])
def test_patterns_that_can_never_meet_are_accepted(entries, allowed):
    doc = bindings.parse(_file(*entries), "b.json")
    for namespace, account, policy in allowed:
        assert bindings.check(doc, namespace, account, [policy])


def test_the_single_pattern_refusal_suggests_a_spelling_the_rest_of_the_file_accepts():
    """`{service_account}.db` was answered with `{service_account}_db`, which `{namespace}.*` then overlapped."""
    entries = [{"namespaces": ["*"], "policies": ["{namespace}.*"]},
               {"namespaces": ["*"], "policies": ["{service_account}.db"]}]
    with pytest.raises(DriverError, match="lets one pod claim another's policies") as refused:
        bindings.parse(_file(*entries), "b.json")
    advice = _advice(str(refused.value))
    assert advice != "{service_account}_db"
    doc = bindings.parse(_file(entries[0], {"namespaces": ["*"], "policies": [advice]}), "b.json")
    with pytest.raises(DriverError, match="is not bound"):
        bindings.check(doc, "dev", "shop.web", ["shop.web_db"])
    # alone, the plain fix is still what is suggested
    with pytest.raises(DriverError, match=re.escape("e.g. '{service_account}_db'")):
        bindings.parse(_file(entries[1]), "b.json")


def test_policy_names_are_compared_as_vault_keeps_them_in_lower_case():
    """Vault lower-cases policy names (`App.shop.db` is minted as `app.shop.db`): `App.{namespace}.*` beside
    `{namespace}.*` overlaps exactly as `app.{namespace}.*` does, and a request is checked as it will be minted."""
    with pytest.raises(DriverError, match="lets one pod claim another's policies"):
        bindings.parse(_file({"namespaces": ["*"], "policies": ["{namespace}.*"]},
                             {"namespaces": ["*"], "policies": ["App.{namespace}.*"]}), "b.json")
    doc = bindings.parse(_file({"namespaces": ["*"], "policies": ["Nginx", "{namespace}.*"]}), "b.json")
    assert bindings.check(doc, "shop", "web", ["NGINX", "Shop.DB"])
    with pytest.raises(DriverError, match="is not bound"):
        bindings.check(doc, "dev", "web", ["Shop.DB"])  # minted as shop.db: namespace shop's


MANY_GLOBS = [f"*{w}*" for w in ("payments", "billing", "shop", "search", "cart", "auth", "ads", "ml", "data",
                                 "web", "api", "ops", "infra", "mail")]


def test_many_globs_in_one_binding_are_checked_within_bounds_and_an_overlap_is_still_found():
    """Fourteen `*team*` namespace globs made the side-by-side run explore ~2^14 state sets: tens of seconds
    and gigabytes on every FlexVolume mount. Past its budget the comparison reads each placeholder as any
    name of its kind, which can only find more overlaps: a safe file stays accepted, an unsafe one refused."""
    started = time.monotonic()
    safe = bindings.parse(_file({"namespaces": MANY_GLOBS, "policies": ["{namespace}.*",
                                                                        "{namespace}_{service_account}_*"]}), "b.json")
    assert time.monotonic() - started < 5  # was 30 s and more (a kubelet call's whole budget)
    assert bindings.check(safe, "shop", "web", ["shop.db", "shop_web_x"])
    # `shop.web.db`: namespace shop's by the first, namespace web's by the second (both match a glob)
    with pytest.raises(DriverError, match=re.escape("'{namespace}.*' and 'shop.{namespace}.*'")):
        bindings.parse(_file({"namespaces": MANY_GLOBS, "policies": ["{namespace}.*", "shop.{namespace}.*"]}),
                       "b.json")


def test_hundreds_of_per_team_bindings_are_compared_only_where_they_can_meet():
    """The documented per-team spelling, 400 times: every pair of groups was run side by side (8.6 s a
    mount); patterns whose leading text differs (`team1-`, `team2-`) cannot meet and are not run."""
    started = time.monotonic()
    doc = bindings.parse(_file(*({"namespaces": [f"team{i}"], "policies": [f"team{i}-{{service_account}}"]}
                                 for i in range(400))), "b.json")
    assert time.monotonic() - started < 5
    assert bindings.check(doc, "team7", "api", ["team7-api"])
    with pytest.raises(DriverError, match="is not bound"):
        bindings.check(doc, "team7", "api", ["team8-api"])


def test_a_yaml_file_with_overlapping_patterns_refuses_every_request(tmp_path):
    path = write(tmp_path / "b.yaml",
                 'bindings:\n  - namespaces: ["*"]\n    policies: ["{namespace}.*", "app.{namespace}.*"]\n')
    with pytest.raises(DriverError, match="overlap"):
        bindings.load(path)


_globs = st.sampled_from([["*"], ["*"], ["team-*"], ["a*", "shop"], ["x"]])
_file_pieces = st.sampled_from(["{namespace}", "{service_account}", "*", ".", "_", "-", "db", "app.", "x"])
_placeholder_patterns = st.lists(_file_pieces, min_size=1, max_size=5).map("".join).filter(lambda p: "{" in p)
_NS = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SA = rf"{_NS}(\.{_NS})*"


def _read(pattern: str, policy: str) -> dict[str, str] | None:
    """The identity `pattern` reads from `policy` (placeholder -> value), None if it cannot produce it."""
    regex, seen = "", []
    for part in re.split(r"(\*|\{namespace\}|\{service_account\})", pattern):
        if part == "*":
            regex += ".*"
        elif part in ("{namespace}", "{service_account}"):
            group = part[1:-1]
            regex += f"(?P={group})" if group in seen else f"(?P<{group}>{_NS if group == 'namespace' else _SA})"
            seen.append(group)
        else:
            regex += re.escape(part)
    found = re.fullmatch(regex, policy)
    return None if found is None else {"{" + g + "}": found.group(g) for g in seen}


@settings(max_examples=400, deadline=None)
@given(patterns=st.lists(_placeholder_patterns, min_size=2, max_size=3, unique=True),
       globs=st.lists(st.tuples(_globs, _globs), min_size=3, max_size=3), split=st.booleans(),
       first=st.tuples(_names, _accounts), filler=st.from_regex(r"[a-z0-9._-]{0,6}", fullmatch=True))
def test_whatever_file_is_accepted_a_policy_name_says_whose_it_is(patterns, globs, split, first, filler):
    """Several patterns, in one binding or several with their own namespace/service-account lists: once the file
    is accepted, a name one pattern makes for a pod is given to another pod only if they agree on every
    placeholder that pattern uses, however the other patterns could read the name."""
    entries = ([{"namespaces": ns, "service_accounts": sa, "policies": [p]}
                for p, (ns, sa) in zip(patterns, globs, strict=False)]
               if split else [{"namespaces": globs[0][0], "service_accounts": globs[0][1], "policies": patterns}])
    try:
        doc = bindings.parse(_file(*entries))
    except DriverError:
        return  # refusing a file is always allowed
    for pattern in patterns:
        policy = pattern.replace("{namespace}", first[0]).replace("{service_account}", first[1]).replace("*", filler)
        if not is_safe_name(policy):
            continue
        try:
            bindings.check(doc, *first, [policy])
        except DriverError:
            continue  # its binding does not cover this pod
        for other in patterns:
            read = _read(other, policy)
            if read is None:
                continue
            # what `other` leaves free, any pod its binding covers may have: take one unlike `first`
            second = (read.get("{namespace}", "zz-" + first[0][:8]),
                      read.get("{service_account}", "zz-" + first[1][:8]))
            if ("{namespace}" in pattern and second[0] != first[0]) or (
                    "{service_account}" in pattern and second[1] != first[1]):
                with pytest.raises(DriverError):
                    bindings.check(doc, *second, [policy])


# --- YAML: PyYAML with a strict loader, reading every old-subset document the same ----------------

EXAMPLE_YAML = """\
# which pods may ask for which policies
---
bindings:
  - name: shop apps            # shown in refusals
    namespaces: [shop, "team-*"]
    service_accounts:
    - "*"
    policies:
      - "{namespace}.*"
      - common
  -   namespaces: ['payments']
      service_accounts: [api]
      policies: ["payments-{service_account}"]
  - service_accounts: [backup]
    policies: [backup-reader]
"""


def test_the_documented_yaml_example_reads_like_its_json():
    assert bindings.load_yaml(EXAMPLE_YAML) == parse_yaml_subset(EXAMPLE_YAML) == yaml.safe_load(EXAMPLE_YAML)
    assert bindings.parse(EXAMPLE_YAML).rules == rules().rules


@pytest.mark.parametrize("text, expected", [
    ("a: x\na: y", "line 2, column 1: duplicate key 'a'"),
    ("bindings:\n  - namespaces: [a]\n    namespaces: ['*']\n    policies: [x]", "line 3, column 5: duplicate key"),
    ("true: x", "line 1, column 1: 'true' is read by YAML as bool True, not a string: quote it"),
    ("1: x", "'1' is read by YAML as int 1"),
    ("bindings: &a [x]\nother: *a", "line 2, column 8: aliases"),
    ("base: &b {policies: [x]}\nbindings:\n  - <<: *b", "aliases"),
    ("bindings:\n  - <<: {policies: [x]}", "merge keys"),
    ("bindings: [a]\n---\nbindings: [b]", "expected a single document"),
    ("bindings: [a, [b]", "line 1"),
    ("bindings:\n\t- x", "line 2"),
    ("bindings: !!python/object:os.system x", "could not determine a constructor"),
])
def test_yaml_the_strict_loader_refuses_names_the_line(text, expected):
    with pytest.raises(DriverError) as refused:
        bindings.parse(text, "b.yaml")
    assert "b.yaml" in str(refused.value) and expected in str(refused.value)


@pytest.mark.parametrize("value", ["yes", "on", "off", "no", "true", "123", "0x1f", "1.5", "null", "~", "2024-01-01"])
def test_a_value_yaml_reads_as_no_string_is_refused_where_a_string_is_meant(value):
    for text, line in ((f"bindings:\n  - namespaces: [{value}]\n    policies: [x]\n", 2),
                       (f"bindings:\n  - namespaces: [a]\n    policies: [x]\n    name: {value}\n", 4)):
        with pytest.raises(DriverError) as refused:
            bindings.parse(text, "b.yaml")
        assert f"b.yaml: not valid bindings YAML: line {line}, column" in str(refused.value)
        assert f"{value!r} is read by YAML as" in str(refused.value) and "quote it" in str(refused.value)
    quoted = f'bindings:\n  - namespaces: ["*"]\n    policies: [x]\n    name: "{value}"\n'
    assert bindings.parse(quoted, "b.yaml").rules[0].name == value  # quoted, it is the string


def test_empty_yaml_is_refused():
    for text in ("", "# only a comment\n", "---\n"):
        with pytest.raises(DriverError, match="exactly one key"):
            bindings.parse(text, "b.yaml")


# Documents built from the shapes a bindings file uses, written in varied YAML styles.
_scalars = st.one_of(
    st.from_regex(r"[a-z][a-z0-9*-]{0,8}( [a-z]{1,4})?", fullmatch=True),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8),
    st.sampled_from(["yes", "No", "null", "~", "1", "0x1f", "1.5", "2024-01-01", "*", "{namespace}.*", "a: b",
                     "#x", "a #b", "'q'", '"q"', "-x", "- x", "[x]", "é", "a\\b"]),
)
_keys = st.sampled_from(["bindings", "name", "namespaces", "service_accounts", "policies", "x_1", "true", "y"])
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)), max_leaves=8)


def _scalar_text(value: str, style: int) -> str:
    return [value, f'"{value}"', f"'{value}'"][style % 3]


def _render(value, indent: int, draw) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                if isinstance(item, list) and all(isinstance(i, str) for i in item) and draw(st.booleans()):
                    lines.append(f"{pad}{key}: [{', '.join(_scalar_text(i, draw(st.integers(0, 2))) for i in item)}]")
                    continue
                lines.append(f"{pad}{key}:")
                lines += _render(item, indent + draw(st.sampled_from([0, 2, 4])) if isinstance(item, list)
                                 else indent + draw(st.sampled_from([2, 4])), draw)
            else:
                text = "[]" if item == [] else "{}" if item == {} else _scalar_text(item, draw(st.integers(0, 2)))
                lines.append(f"{pad}{key}: {text}" + draw(st.sampled_from(["", "  # c", " #c"])))
        return lines or [f"{pad}{{}}"]
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, dict) and item:
                sub = _render(item, indent + 2, draw)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines += sub[1:]
            elif isinstance(item, list) and item:
                lines.append(f"{pad}-")
                lines += _render(item, indent + 2, draw)
            else:
                text = "[]" if item == [] else "{}" if item == {} else _scalar_text(item, draw(st.integers(0, 2)))
                lines.append(f"{pad}- {text}")
        return lines or [f"{pad}[]"]
    return [pad + _scalar_text(value, draw(st.integers(0, 2)))]


@st.composite
def yaml_documents(draw) -> str:
    lines = _render(draw(st.dictionaries(_keys, _values, min_size=1, max_size=3)), 0, draw)
    if draw(st.booleans()):  # a mutation: a line dropped, duplicated or shifted
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["drop", "dup", "shift"]))
        if kind == "drop" and len(lines) > 1:
            del lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        else:
            lines[i] = " " + lines[i]
    return "\n".join(lines) + "\n"


@settings(max_examples=400, deadline=None)
@given(yaml_documents())
def test_whatever_the_old_subset_accepted_the_loader_reads_the_same(text):
    try:
        old = parse_yaml_subset(text)
    except DriverError:
        return  # the old subset refused it: nothing to keep
    assert bindings.load_yaml(text) == old == yaml.safe_load(text), text


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list("ab:- #'\"[],{}*\n\t|&!.1y")), max_size=40))
def test_random_yaml_like_text_is_refused_or_read_the_same(text):
    try:
        old = parse_yaml_subset(text)
    except DriverError:
        return
    assert bindings.load_yaml(text) == old == yaml.safe_load(text), repr(text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"namespaces": st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,6}\*?", fullmatch=True), min_size=1, max_size=3),
     "policies": st.lists(st.from_regex(r"[a-z][a-z0-9_.-]{0,6}(\.\*)?", fullmatch=True), min_size=1, max_size=3)},
    optional={"name": st.from_regex(r"[a-z]{1,5}( [a-z]{1,5})?", fullmatch=True),
              "service_accounts": st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True),
                                           min_size=1, max_size=2)}),
    min_size=1, max_size=4))
def test_canonical_yaml_of_any_valid_bindings_file_is_accepted(entries):
    # The style the README documents: every valid bindings file written that way is read.
    lines = ["bindings:"]
    for entry in entries:
        first = True
        for key, value in entry.items():
            text = f'"{value}"' if isinstance(value, str) else "[" + ", ".join(f'"{v}"' for v in value) + "]"
            lines.append(f"{'  - ' if first else '    '}{key}: {text}")
            first = False
    text = "\n".join(lines) + "\n"
    assert bindings.load_yaml(text) == parse_yaml_subset(text) == yaml.safe_load(text) == {"bindings": entries}
    assert len(bindings.parse(text).rules) == len(entries)
