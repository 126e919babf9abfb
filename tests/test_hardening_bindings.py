"""vaulttmpfs.bindings on its own: the matching rules, the file checks, and the YAML subset checked
against a real YAML parser (PyYAML, a test-only dependency) so the subset never reads a file
differently from what an operator's YAML tools show."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vaulttmpfs.engine import bindings
from vaulttmpfs.errors import DriverError

RULES = {"bindings": [
    {"name": "shop apps", "namespaces": ["shop", "team-*"], "service_accounts": ["*"],
     "policies": ["{namespace}-*", "common"]},
    {"namespaces": ["payments"], "service_accounts": ["api"], "policies": ["payments-{service_account}"]},
    {"service_accounts": ["backup"], "policies": ["backup-reader"]},
]}


def rules() -> bindings.Bindings:
    return bindings.parse(json.dumps(RULES), "/etc/vaulttmpfs/bindings.json")


@pytest.mark.parametrize("namespace, account, policies, rule", [
    ("shop", "web", ["shop-db", "common"], "binding #1"),
    ("team-a", "default", ["team-a-cache"], "binding #1"),
    ("payments", "api", ["payments-api"], "binding #2"),
    ("anything", "backup", ["backup-reader"], "binding #3"),
    ("shop", "backup", ["shop-x", "backup-reader"], "binding #1, binding #3"),
])
def test_requests_inside_a_binding_are_allowed(namespace, account, policies, rule):
    assert bindings.check(rules(), namespace, account, policies) == rule


@pytest.mark.parametrize("namespace, account, policies, expected", [
    # another namespace's policies: the namespace-hopping escalation this closes
    ("shop", "web", ["payments-api"],
     "policy 'payments-api' is not bound to service account 'web' in namespace 'shop'"),
    ("team-a", "web", ["shop-db"], "binding #1 'shop apps'"),
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
    # A `*` smuggled in through a spoofed option must not widen `{namespace}-*`.
    with pytest.raises(DriverError, match="missing or"):
        bindings.check(rules(), namespace, account, ["common"])


@given(namespace=st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True),
       other=st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
       suffix=st.from_regex(r"[A-Za-z0-9._-]{0,12}", fullmatch=True))
def test_namespace_placeholder_only_ever_matches_the_pods_own_namespace(namespace, other, suffix):
    doc = bindings.parse(json.dumps({"bindings": [{"namespaces": ["*"], "policies": ["{namespace}-*"]}]}))
    assert bindings.check(doc, namespace, "default", [f"{namespace}-{suffix}"])
    if not f"{other}-{suffix}".startswith(f"{namespace}-"):
        with pytest.raises(DriverError):
            bindings.check(doc, namespace, "default", [f"{other}-{suffix}"])


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
    path.write_text(text)
    os.chown(path, uid, 0)
    path.chmod(mode)
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


# --- the YAML subset ----------------------------------------------------------------------------

EXAMPLE_YAML = """\
# which pods may ask for which policies
---
bindings:
  - name: shop apps            # shown in refusals
    namespaces: [shop, "team-*"]
    service_accounts:
    - "*"
    policies:
      - "{namespace}-*"
      - common
  -   namespaces: ['payments']
      service_accounts: [api]
      policies: ["payments-{service_account}"]
  - service_accounts: [backup]
    policies: [backup-reader]
"""


def test_the_documented_yaml_example_reads_like_its_json():
    assert bindings.parse_yaml_subset(EXAMPLE_YAML) == yaml.safe_load(EXAMPLE_YAML)
    assert bindings.parse(EXAMPLE_YAML).rules == rules().rules


@pytest.mark.parametrize("text, expected", [
    ("bindings: &a [x]", "quote the value"),
    ("bindings: !!str x", "quote the value"),
    ("bindings: {a: b}", "quote the value"),
    ("bindings: |\n  x", "quote the value"),
    ("bindings:\n\t- x", "tabs"),
    ("bindings: [a, [b]]", "unsupported [list]"),
    ("bindings: [a,", "open and close on one line"),
    ("bindings: yes", "quote the value 'yes'"),
    ("bindings: [on, off]", "quote the value 'on'"),
    ("bindings: \"a\\nb\"", "no escapes"),
    ("a: x\na: y", "duplicate key 'a'"),
    ("true: x", "would not be read as a string"),
    ("bindings:\n  - a\n   - b", "unexpected indentation"),
    ("", "empty"),
    ("# only a comment\n", "empty"),
])
def test_yaml_outside_the_subset_is_refused_with_the_line(text, expected):
    with pytest.raises(DriverError) as refused:
        bindings.parse_yaml_subset(text, "b.yaml")
    assert expected in str(refused.value)
    assert "b.yaml line" in str(refused.value) and "yq -o json" in str(refused.value)


# Documents built from the shapes a bindings file uses, written in varied YAML styles.
_scalars = st.one_of(
    st.from_regex(r"[a-z][a-z0-9*-]{0,8}( [a-z]{1,4})?", fullmatch=True),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8),
    st.sampled_from(["yes", "No", "null", "~", "1", "0x1f", "1.5", "2024-01-01", "*", "{namespace}-*", "a: b",
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
def test_whatever_the_subset_accepts_a_real_yaml_parser_reads_the_same(text):
    try:
        mine = bindings.parse_yaml_subset(text)
    except DriverError:
        return  # refusing is always allowed; reading differently never is
    assert mine == yaml.safe_load(text), text


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list("ab:- #'\"[],{}*\n\t|&!.1y")), max_size=40))
def test_random_yaml_like_text_is_refused_or_read_the_same(text):
    try:
        mine = bindings.parse_yaml_subset(text)
    except DriverError:
        return
    assert mine == yaml.safe_load(text), repr(text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"namespaces": st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,6}\*?", fullmatch=True), min_size=1, max_size=3),
     "policies": st.lists(st.from_regex(r"[a-z][a-z0-9_.-]{0,6}(-\*)?", fullmatch=True), min_size=1, max_size=3)},
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
    assert bindings.parse_yaml_subset(text) == yaml.safe_load(text) == {"bindings": entries}
    assert len(bindings.parse(text).rules) == len(entries)
