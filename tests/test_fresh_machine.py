"""The README's two commands on a fresh machine, and test servers that never outlive their run.

A clean clone of HEAD in a dir only its owner can enter (as /root is on Debian), the system's PATH
only and Debian's own (PEP 668, externally managed) /usr/bin/python3: `make demo` does all of its own
set-up and ends with the token revoked, the same clone's `make test` collects the suite (collection
only: running the whole suite again from inside the suite would double `make test`; `.ci/run` runs it
in full), and the clone's tests that act as another user pass there.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import BUILD_EXE
from .otheruser import MARK, become, other_user, shared_dir
from .vaultserver import REPO

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_PYTHON = "/usr/bin/python3"


def pip_cache() -> str:
    """This user's pip cache: the clone's venv reuses the wheels the outer `make venv` fetched."""
    return os.environ.get("PIP_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip")


def fresh_make(clone: Path, home: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {"PATH": SYSTEM_PATH, "HOME": str(home), "PIP_CACHE_DIR": pip_cache()}
    return subprocess.run(["make", *args, f"PYTHON={DEBIAN_PYTHON}"], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A clean clone of HEAD and its `make demo`, which makes the clone's venv."""
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.fail(f"no {DEBIAN_PYTHON}: this test is about the system's python3")
    home = tmp_path_factory.mktemp("fresh")
    home.chmod(0o700)  # like /root: no other user may enter the clone
    clone = home / "vaulttmpfs"
    # CI may check the repo out as another user than the one running the suite (root).
    (home / ".gitconfig").write_text("[safe]\n\tdirectory = *\n")
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=60,
                   env={"PATH": SYSTEM_PATH, "HOME": str(home)})
    return clone, fresh_make(clone, home, "demo", timeout=600)


def test_make_demo_on_a_clean_clone_with_the_system_python(demo_run):
    clone, result = demo_run
    assert result.returncode == 0, result.stdout[-4000:]
    assert (clone / ".venv/bin/bao").exists()  # the venv's own OpenBao, not whatever PATH had
    assert (clone / ".venv/bin/kubectl").exists()  # its own kubectl (the manifest tests' kustomize), likewise
    assert ": revoked; volume mounted: False" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("DEMO OK") and "revoked on unmount" in last, result.stdout[-4000:]


def test_make_test_collects_the_suite_in_the_same_clone(demo_run):
    """Collection only, with the venv the demo made: no build, no LDAP server download."""
    clone, demo = demo_run
    assert demo.returncode == 0, demo.stdout[-4000:]
    result = fresh_make(clone, clone.parent, "test", "PYTEST_ARGS=--collect-only", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "tests/test_fresh_machine.py::test_make_demo_on_a_clean_clone_with_the_system_python" in result.stdout
    collected = [line for line in result.stdout.splitlines() if " tests collected" in line]
    assert collected and int(collected[-1].split()[0]) > 100, result.stdout[-2000:]
    assert not (clone / "dist").exists() and not (clone / "build/openbao-ldap").exists()


@other_user
def test_a_user_without_subordinate_ids_is_told_the_exact_fix():
    """make's user namespace needs the user's subordinate ids; `nobody` has none (and its own
    uid/gid exist both for real root and in the suite's namespace, which maps 0..65535).
    It runs a copy of tests/userns.sh: the checkout may sit where `nobody` cannot go."""
    shared = shared_dir()
    try:
        script = shutil.copy(REPO / "tests/userns.sh", shared / "userns.sh")
        shared.chmod(0o755)
        result = subprocess.run([str(script), "true"], preexec_fn=become, capture_output=True,
                                text=True, timeout=30, env={"PATH": SYSTEM_PATH}, cwd="/")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert result.returncode == 1 and result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("tests/userns.sh: user nobody needs 65535 subordinate uids and gids"), message
    usermod, add_uids, uids, add_gids, gids, user = message.splitlines()[-1].split()
    assert (usermod, add_uids, add_gids, user) == ("usermod", "--add-subuids", "--add-subgids", "nobody")
    taken = [line.split(":") for name in ("/etc/subuid", "/etc/subgid") if os.path.exists(name)
             for line in Path(name).read_text().splitlines() if line.count(":") == 2]
    for ids in (uids, gids):  # a range of 65536 past every range already given out
        first, last = map(int, ids.split("-"))
        assert last - first + 1 == 65536 and first >= 100000
        assert all(first >= int(start) + int(count) for _, start, count in taken), (ids, taken)


def test_the_tests_that_act_as_another_user_pass_in_a_clone_no_one_else_can_enter(demo_run, tmp_path):
    """The clone's own venv and pytest, with TMPDIR private too (pytest's dirs go there)."""
    clone, demo = demo_run
    assert demo.returncode == 0, demo.stdout[-4000:]
    assert stat.S_IMODE(clone.parent.stat().st_mode) == 0o700
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir(mode=0o700)
    # The clone has no build (making one takes minutes here); this checkout's is of the same tree.
    env = {"PATH": SYSTEM_PATH, "HOME": str(clone.parent), "TMPDIR": str(private_tmp),
           "VAULTTMPFS_BUILD_EXE": str(BUILD_EXE)}
    result = subprocess.run([str(clone / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-rA", "-m", MARK], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    passed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("PASSED ")}
    assert {"tests/test_fresh_machine.py::test_a_user_without_subordinate_ids_is_told_the_exact_fix",
            *(f"tests/test_relay.py::{name}[{kind}]" for kind in ("source", "build") for name in (
                "test_a_caller_that_is_not_root_is_refused",
                "test_a_socket_served_by_someone_other_than_root_gets_no_call"))} <= passed, result.stdout[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert f"{len(passed)} passed" in summary and not any(
        word in summary for word in ("failed", "skipped", "error", "xfail")), summary


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.vaultserver import VaultServer
from tests.ldapserver import LdapServer, User
bao = VaultServer().start()
ldap = LdapServer([User("alice", "pw")]).start()
print(bao.proc.pid, ldap.proc.pid, bao.workdir, ldap.workdir, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_test_servers_die_with_a_killed_test_run():
    """kill -9 of the process that started OpenBao and slapd (an interrupted `make test`) takes them along."""
    run = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO))], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, text=True)
    servers: list[int] = []
    line: list[str] = []
    try:
        line = run.stdout.readline().split()
        assert len(line) == 4, f"the child did not start its servers (exit {run.poll()})"
        servers = [int(pid) for pid in line[:2]]
        assert all(alive(pid) for pid in servers)
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in servers if alive(pid)] == [], "a test server outlived its killed run"
    finally:
        run.kill()
        run.wait()
        for pid in servers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for workdir in line[2:]:
            shutil.rmtree(workdir, ignore_errors=True)
