"""The paths root acts on are walked as given (issue 20 item 7): every directory on the way, the
ones holding a symlink too, then the symlink's target the same way.

The hole it closes, tried as a node user would: with the bindings at `<dir 0777>/conf/bindings.json`,
that user moved `conf` aside and put a symlink to another root-owned directory holding permissive
bindings in its place; a check that resolved the path first walked only the target's directories,
and the next mount gave namespace `dev` a token for `payments-db`. That scenario runs the driver as
the kubelet does; the matrix below calls the checks in process, for a symlink at each level of each
kind of guarded path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vaulttmpfs import config, trust
from vaulttmpfs.engine import bindings, generator
from vaulttmpfs.engine import state as state_module
from vaulttmpfs.errors import DriverError
from vaulttmpfs.ops import bootstrap, install

from .conftest import token_file
from .vaultserver import POLICIES
from .volumes import assert_refused, teardown_ok, write_bindings

NODE_USER = 1000  # a user on the node: not root, no group of root's
ROLE = "trust-paths"
DEV_ONLY = {"bindings": [{"name": "dev", "namespaces": ["dev"], "policies": ["nginx"]}]}
PERMISSIVE = {"bindings": [{"name": "anything", "namespaces": ["*"], "policies": ["*"]}]}


def as_node_user() -> None:
    os.setgroups([])
    os.setgid(NODE_USER)
    os.setuid(NODE_USER)


def node_user(script: str, cwd: Path) -> None:
    """A shell command run by the node user, as they would type it."""
    subprocess.run(["sh", "-ec", script], cwd=cwd, preexec_fn=as_node_user, check=True, timeout=30)


@pytest.fixture
def scratch():
    """A root-owned 0755 dir the node user can reach (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vaulttmpfs-trust-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def payments_generator(bao, tmp_path_factory):
    """A role that allows payments-db, and a generator token that may use it: only the bindings
    stand between namespace `dev` and that policy."""
    bao.write_policy("payments-db", 'path "secret/data/payments/*" { capabilities = ["read"] }')
    example = json.loads((POLICIES / "applications_role.json").read_text())
    bao.write_role(ROLE, **{**example, "allowed_policies": ["nginx", "payments-db"]})
    bao.write_policy(f"{ROLE}-generator", f'path "auth/token/create/{ROLE}" {{ capabilities = ["create", "update"] }}')
    auth = bao.create_token(policies=["token_generator", f"{ROLE}-generator"], no_default_policy=True, ttl="1h")
    yield token_file(tmp_path_factory.mktemp("payments-generator"), auth["client_token"])
    bao.revoke_token(auth["client_token"])


@pytest.fixture
def node(kubelet, payments_generator):
    kubelet.env["VAULTTMPFS_ROLE_NAME"] = ROLE
    kubelet.env["VAULTTMPFS_GENERATOR_TOKEN_PATH"] = payments_generator
    return kubelet


# --- the scenario, through the driver -------------------------------------------------------------

def test_a_node_user_swapping_the_bindings_dir_through_a_writable_dir_above_gets_nothing(node, bao, scratch):
    shared = scratch / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "conf").mkdir()
    node.env["VAULTTMPFS_POLICY_BINDINGS"] = write_bindings(shared / "conf" / "bindings.json", DEV_ONLY)
    (scratch / "elsewhere").mkdir()  # root's, trusted, with bindings that allow anything
    write_bindings(scratch / "elsewhere" / "bindings.json", PERMISSIVE)
    untrusted = f"directory {shared} is not trusted"

    before = len(bao.accessors())
    reply, _ = node.mount(node.new_pod("app", namespace="dev"), {"vault/policies": "payments-db"})
    assert_refused(reply, node, bao, before, untrusted)

    node_user(f"mv conf conf.old && ln -s {scratch / 'elsewhere'} conf", cwd=shared)
    planted = os.lstat(shared / "conf")
    assert planted.st_uid == NODE_USER and (shared / "conf").is_symlink()

    reply, _ = node.mount(node.new_pod("app", namespace="dev"), {"vault/policies": "payments-db"})
    assert_refused(reply, node, bao, before, untrusted)
    assert "chmod go-w" in reply.message


def test_a_symlink_a_node_user_planted_in_a_sticky_dir_is_not_followed(node, bao, scratch):
    """/tmp-like: the user cannot move root's entries, but may create a missing one first."""
    sticky = scratch / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    node.env["VAULTTMPFS_POLICY_BINDINGS"] = str(sticky / "conf" / "bindings.json")  # conf not made yet
    (scratch / "elsewhere").mkdir()
    write_bindings(scratch / "elsewhere" / "bindings.json", PERMISSIVE)
    node_user(f"ln -s {scratch / 'elsewhere'} conf", cwd=sticky)

    before = len(bao.accessors())
    reply, _ = node.mount(node.new_pod("app", namespace="dev"), {"vault/policies": "payments-db"})
    assert_refused(reply, node, bao, before, f"symlink {sticky / 'conf'} is owned by uid {NODE_USER}")


def test_bindings_reached_through_roots_own_symlinks_still_work(node, bao, scratch):
    """As /var/run -> /run: a root-owned link in root-owned dirs to a trusted dir is followed."""
    (scratch / "run" / "vaulttmpfs").mkdir(parents=True)
    write_bindings(scratch / "run" / "vaulttmpfs" / "bindings.json", DEV_ONLY)
    (scratch / "var").mkdir()
    (scratch / "var" / "run").symlink_to("../run")
    node.env["VAULTTMPFS_POLICY_BINDINGS"] = str(scratch / "var" / "run" / "vaulttmpfs" / "bindings.json")

    reply, path = node.mount(node.new_pod("app", namespace="dev"), {"vault/policies": "nginx"})
    assert reply.ok, reply.body
    teardown_ok(node, path)
    before = len(bao.accessors())
    reply, _ = node.mount(node.new_pod("app", namespace="dev"), {"vault/policies": "payments-db"})
    assert_refused(reply, node, bao, before, "policy 'payments-db' is not bound")


# --- a symlink at each level of each guarded path, in process ---------------------------------------

def _file(text: str, mode: int):
    def make(path: Path) -> None:
        path.write_text(text)
        os.chown(path, 0, 0)
        path.chmod(mode)
    return make


def _dir(mode: int):
    def make(path: Path) -> None:
        path.mkdir()
        path.chmod(mode)
    return make


# name, last component, how to make it, the check the driver (or an operator command) makes
KINDS = {
    "bindings": ("bindings.json", _file(json.dumps(DEV_ONLY), 0o644), bindings.load),
    "config file": ("config.env", _file("VAULT_ADDR=http://127.0.0.1:8200\n", 0o644), config.file_values),
    "generator token": ("vaulttoken", _file("s.not-a-live-token\n", 0o600), generator.read_token),
    "generator token dir": ("tokens", _dir(0o700), lambda path: bootstrap._make_token_dir(f"{path}/vaulttoken")),
    "state dir": ("state", _dir(0o700), lambda path: state_module.StateStore(path).trust()),
    "plugin dir": ("exec", _dir(0o755), install._check_plugin_dir),
}
LEVELS = ["l1", "l2", "l3", "leaf"]


def guarded_path(base: Path, kind: str, level: str) -> tuple[Path, Path, Path]:
    """base/tree/l1/l2/l3/<leaf>, with the component at `level` moved to base/aside and a root-owned
    symlink to it left in its place. Returns the path as given, the dir holding the link, the link."""
    leaf, make, _ = KINDS[kind]
    names = ["l1", "l2", "l3", leaf]
    tree = base / "tree"
    (tree / "l1" / "l2" / "l3").mkdir(parents=True)
    given = tree.joinpath(*names)
    make(given)
    link = tree.joinpath(*names[:LEVELS.index(level) + 1])
    aside = base / "aside"
    aside.mkdir()
    link.rename(aside / link.name)
    link.symlink_to(os.path.relpath(aside / link.name, link.parent))  # relative, as `ln -rs` makes
    assert os.path.realpath(given) != str(given)
    return given, link.parent, link


def check(kind: str, given: Path):
    return KINDS[kind][2](str(given))


@pytest.mark.parametrize("holder_mode", [0o755, 0o1777], ids=["root's dir", "sticky dir"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", KINDS)
def test_roots_symlink_is_followed(scratch, kind, level, holder_mode):
    """/var/run -> /run: nobody but root can change any of it. Others may add entries to a root-owned
    sticky dir (/tmp), but not move or replace root's link."""
    given, holder, _ = guarded_path(scratch, kind, level)
    holder.chmod(holder_mode)
    check(kind, given)


def _in_a_dir_others_can_write(holder: Path, link: Path, aside: Path) -> str:
    holder.chmod(0o777)  # the scenario: whoever can write the dir could have planted the link
    return f"directory {holder} is not trusted .*chmod go-w {holder}"


def _a_node_users_in_a_sticky_dir(holder: Path, link: Path, aside: Path) -> str:
    holder.chmod(0o1777)
    os.lchown(link, NODE_USER, NODE_USER)  # its owner may remove it and plant another (protected_symlinks)
    return f"symlink {link} is owned by uid {NODE_USER} in {holder}"


def _to_a_dir_others_can_write(holder: Path, link: Path, aside: Path) -> str:
    aside.chmod(0o777)
    return f"directory {aside} is not trusted"


UNTRUSTED_LINKS = {f.__name__.strip("_"): f for f in (_in_a_dir_others_can_write, _a_node_users_in_a_sticky_dir,
                                                     _to_a_dir_others_can_write)}


@pytest.mark.parametrize("placement", UNTRUSTED_LINKS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_symlink_someone_else_could_have_planted_or_aimed_is_refused(scratch, kind, level, placement):
    given, holder, link = guarded_path(scratch, kind, level)
    expected = UNTRUSTED_LINKS[placement](holder, link, scratch / "aside")
    with pytest.raises(DriverError, match=expected):
        check(kind, given)


@pytest.mark.parametrize("kind", KINDS)
def test_a_symlink_loop_is_refused(scratch, kind):
    (scratch / "a").symlink_to("b")
    (scratch / "b").symlink_to("a")
    with pytest.raises(DriverError, match=f"more than {trust.MAX_SYMLINKS} symlinks on the way .a loop"):
        check(kind, scratch / "a" / KINDS[kind][0])


@pytest.mark.parametrize("kind", KINDS)
def test_a_dotdot_in_the_path_given_is_refused(scratch, kind):
    """os.path.abspath folds `l1/link/..` to `l1`; the kernel goes to the link target's parent."""
    given, _, _ = guarded_path(scratch, kind, "l2")
    with pytest.raises(DriverError, match="has a `..` in it"):
        check(kind, given.parent / ".." / "l3" / given.name)


def test_the_file_checked_is_the_file_the_kernel_opens(scratch):
    """A `..` in a link's target climbs from where the link before it led, not by spelling."""
    deep = scratch / "elsewhere" / "deep"
    deep.mkdir(parents=True)
    write_bindings(scratch / "elsewhere" / "bindings.json", PERMISSIVE)  # what the kernel reaches
    (scratch / "conf").mkdir()
    write_bindings(scratch / "conf" / "bindings.json", DEV_ONLY)  # what the spelling suggests
    (scratch / "conf" / "inner").symlink_to(deep)
    (scratch / "link").symlink_to("conf/inner/../bindings.json")
    assert bindings.load(str(scratch / "link")).rules[0].name == "anything"
    (scratch / "elsewhere").chmod(0o777)
    with pytest.raises(DriverError, match=f"directory {scratch / 'elsewhere'} is not trusted"):
        bindings.load(str(scratch / "link"))


def test_a_file_replaced_between_the_walk_and_the_open_is_refused(scratch, monkeypatch):
    """Only root could do it (every entry on the way is root's), but the fd read is the inode checked."""
    write_bindings(scratch / "bindings.json", DEV_ONLY)
    write_bindings(scratch / "other.json", PERMISSIVE)
    real_open = os.open

    def open_after_a_swap(path, flags, *args, **kwargs):
        if str(path) == str(scratch / "bindings.json"):
            os.rename(scratch / "other.json", scratch / "bindings.json")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(trust.os, "open", open_after_a_swap)
    with pytest.raises(DriverError, match="changed while it was being checked"):
        bindings.load(str(scratch / "bindings.json"))


def test_a_state_dir_another_user_made_first_in_a_sticky_dir_is_refused(scratch):
    """Checked while missing (the sticky parent passes), made by someone else before the driver's mkdir."""
    sticky = scratch / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    store = state_module.StateStore(str(sticky / "state"))
    store.trust()  # missing: only its parents could be checked
    node_user("mkdir -m 0777 state", cwd=sticky)
    with pytest.raises(DriverError, match=f"directory {sticky / 'state'} is not trusted"):
        store.write_note("generator-check", {})
    assert os.listdir(sticky / "state") == []  # nothing written into it
