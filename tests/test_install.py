"""`vaulttmpfs install` into a temp dir standing in for the host's kubelet plugin dir.

A watcher that behaves like the kubelet's plugin prober (inotify on the plugin dir, recursive
watches on new non-dot dirs, dot names ignored) checks, on every event it would react to and by
polling in between, that whatever the kubelet could exec is a complete bundle.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vaulttmpfs.ops import install as installer

from .conftest import BUILD_EXE, driver_env, source_cmd, unmount_everything_under
from .kubelet import Kubelet, is_mount_point
from .vaultserver import REPO, dies_with_parent, free_port

DRIVER = installer.DRIVER_DIR
EXE = installer.EXE
EXPECTED_INIT = {"status": "Success", "capabilities": {"attach": False, "fsGroup": False}}

# inotify(7)
IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF, IN_ISDIR = 0x100, 0x200, 0x400, 0x800, 0x40000000
# What fsnotify (the kubelet's watcher library) subscribes to.
FSNOTIFY_MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
                 | IN_DELETE_SELF | IN_MOVE_SELF)


# ---------------------------------------------------------------- the bundle under test

def _fresh(exe: Path) -> bool:
    if not os.access(exe, os.X_OK):
        return False
    sources = [*REPO.glob("vaulttmpfs/*.py"), REPO / "build.spec"]
    return exe.stat().st_mtime >= max(p.stat().st_mtime for p in sources)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """A onedir build of the current source, private to this session (the repo's dist/ is not written)."""
    dest = tmp_path_factory.mktemp("bundle")
    if _fresh(BUILD_EXE):
        shutil.copytree(BUILD_EXE.parent, dest / EXE, symlinks=True)
    else:
        subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                        "--distpath", str(dest), "--workpath", str(dest / "work"), str(REPO / "build.spec")],
                       cwd=REPO, check=True, capture_output=True, timeout=600)
    return dest / EXE


def variant(bundle: Path, tmp_path: Path, name: str) -> Path:
    """Another version of the bundle: same program, one more file in its lib dir."""
    other = tmp_path / f"bundle-{name}"
    shutil.copytree(bundle, other, symlinks=True)
    (other / ".vaulttmpfs-lib" / f"release-{name}.txt").write_text(name)
    return other


def run_install(plugin_dir: Path, source: Path | None = None, cmd: list[str] | None = None,
                env: dict | None = None) -> subprocess.CompletedProcess:
    args = [*(cmd or source_cmd()), "install", "--plugin-dir", str(plugin_dir)]
    if source is not None:
        args += ["--source", str(source)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


# ---------------------------------------------------------------- a kubelet-like watcher

def tree(root: Path) -> frozenset:
    """What a bundle is made of: names, kinds, sizes, exec bits, link targets."""
    items = []
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                items.append((rel, "link", os.readlink(path)))
            elif os.path.isdir(path):
                items.append((rel, "dir", 0))
            else:
                items.append((rel, "file", info.st_size, bool(info.st_mode & 0o100)))
    return frozenset(items)


class Inotify:
    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.paths: dict[int, str] = {}

    def add(self, path: str) -> None:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), FSNOTIFY_MASK)
        if wd >= 0:
            self.paths[wd] = path

    def add_recursive(self, path: str) -> None:
        """Like the kubelet's addWatchRecursive (filepath.Walk): dot dirs that exist are walked too."""
        self.add(path)
        for parent, dirs, _ in os.walk(path):
            for name in dirs:
                self.add(os.path.join(parent, name))

    def read(self, timeout: float) -> list[tuple[str, str, int]]:
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        events, offset = [], 0
        while offset < len(data):
            wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode()
            offset += 16 + length
            events.append((self.paths.get(wd, "?"), name, mask))
        return events

    def close(self) -> None:
        os.close(self.fd)


class PluginDirWatcher:
    """Records what the kubelet's prober would react to, and checks the driver at every such moment."""

    def __init__(self, plugin_dir: Path, bundles: list[Path]):
        self.plugin_dir = plugin_dir
        self.expected = {tree(b) for b in bundles}
        self.events: list[tuple[str, str, int]] = []  # (dir, name, mask), non-dot names only
        self.dot_events: list[tuple[str, str, int]] = []
        self.problems: list[str] = []
        self.checks = 0
        self.inotify = Inotify()
        self.inotify.add_recursive(str(plugin_dir))
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, daemon=True),
                         threading.Thread(target=self._poll, daemon=True)]

    def __enter__(self) -> "PluginDirWatcher":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)  # let the last events arrive
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.inotify.close()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for parent, name, mask in self.inotify.read(0.01):
                if not name or name.startswith("."):
                    self.dot_events.append((parent, name, mask))
                    continue  # the kubelet ignores these (and does not watch new dot dirs)
                self.events.append((parent, name, mask))
                if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    self.inotify.add_recursive(os.path.join(parent, name))
                self.check(f"after event {name} {mask:#x} in {parent}")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.check("polling")
            time.sleep(0.001)

    def check(self, when: str) -> None:
        self.checks += 1
        driver_dir = self.plugin_dir / DRIVER
        if not driver_dir.exists():
            return
        exe = driver_dir / EXE
        try:
            if not os.path.lexists(exe):
                raise FileNotFoundError(f"{DRIVER}/ exists without {EXE}")
            real = Path(os.path.realpath(exe))
            found = tree(real.parent)
        except OSError as exc:
            self.problems.append(f"{when}: {exc}")
            return
        if found not in self.expected or not os.access(real, os.X_OK):
            self.problems.append(f"{when}: {exe} -> {real} is not a complete bundle")

    def driver_level_events(self) -> list[tuple[str, int]]:
        driver_dir = str(self.plugin_dir / DRIVER)
        return [(name, mask) for parent, name, mask in self.events if parent == driver_dir]


def snapshot(root: Path) -> dict:
    """Inode, mtime, ctime and size of everything under root (dot files included)."""
    result = {}
    for parent, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.normpath(os.path.join(parent, name))
            info = os.lstat(path)
            result[path] = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
    return result


def kubelet_init(exe: Path) -> dict:
    """Exec the installed driver the way the kubelet probes it."""
    proc = subprocess.run([str(exe), "init"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- tests

def test_first_install_appears_complete_in_one_step(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    plugin_dir.mkdir()
    with PluginDirWatcher(plugin_dir, [bundle]) as watcher:
        result = run_install(plugin_dir, bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("installed: ")
    assert watcher.problems == []
    assert watcher.checks > 10  # the watcher really looked while the install ran
    # The only thing the kubelet saw: the complete driver dir moving in.
    assert [(name, mask & ~IN_ISDIR) for _, name, mask in watcher.events] == [(DRIVER, IN_MOVED_TO)]

    exe = plugin_dir / DRIVER / EXE
    assert os.path.islink(exe) and not os.path.isabs(os.readlink(exe))  # relative: any mount path works
    assert tree(Path(os.path.realpath(exe)).parent) == tree(bundle)
    assert sorted(p.name for p in plugin_dir.iterdir()) == [".vaulttmpfs-install.lock", DRIVER]
    non_dot = [p.name for p in (plugin_dir / DRIVER).iterdir() if not p.name.startswith(".")]
    assert non_dot == [EXE]
    assert kubelet_init(exe) == EXPECTED_INIT


def test_installed_bundle_is_not_writable_by_others(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    (bundle_copy := tmp_path / "loose").mkdir()
    shutil.copytree(bundle, bundle_copy / EXE, symlinks=True)
    os.chmod(bundle_copy / EXE / EXE, 0o777)
    assert run_install(plugin_dir, bundle_copy / EXE).returncode == 0
    for path in (plugin_dir / DRIVER).rglob("*"):
        if not path.is_symlink():
            assert path.stat().st_mode & 0o022 == 0, path


def test_same_version_again_touches_nothing(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    assert run_install(plugin_dir, bundle).returncode == 0
    before = snapshot(plugin_dir)
    with PluginDirWatcher(plugin_dir, [bundle]) as watcher:
        again = run_install(plugin_dir, bundle)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("unchanged: ")
    assert watcher.events == [] and watcher.dot_events == []  # no re-probe, not even a dot-file change
    assert watcher.problems == []
    assert snapshot(plugin_dir) == before


def test_upgrade_swaps_the_link_atomically_and_keeps_the_previous_bundle(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    v2 = variant(bundle, tmp_path, "v2")
    first = run_install(plugin_dir, bundle)
    assert first.returncode == 0
    old = os.readlink(plugin_dir / DRIVER / EXE)

    with PluginDirWatcher(plugin_dir, [bundle, v2]) as watcher:
        upgrade = run_install(plugin_dir, v2)
    assert upgrade.returncode == 0, upgrade.stderr
    assert upgrade.stdout.startswith("upgraded: ")
    assert watcher.problems == []
    # In the driver dir the kubelet saw exactly one change: the executable's name being replaced.
    assert watcher.driver_level_events() == [(EXE, IN_MOVED_TO)]

    exe = plugin_dir / DRIVER / EXE
    new = os.readlink(exe)
    assert new != old
    assert tree(Path(os.path.realpath(exe)).parent) == tree(v2)
    assert os.path.isdir(plugin_dir / DRIVER / os.path.dirname(old))  # calls still running from it
    assert kubelet_init(exe) == EXPECTED_INIT
    assert not (plugin_dir / installer.STAGING).exists()


def test_older_bundles_are_pruned_and_going_back_reuses_the_kept_one(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    v2, v3 = variant(bundle, tmp_path, "v2"), variant(bundle, tmp_path, "v3")
    names = {}
    for label, source in (("v1", bundle), ("v2", v2), ("v3", v3)):
        assert run_install(plugin_dir, source).returncode == 0
        names[label] = os.path.dirname(os.readlink(plugin_dir / DRIVER / EXE))
    bundles = lambda: sorted(p.name for p in (plugin_dir / DRIVER).iterdir() if p.is_dir())  # noqa: E731
    assert bundles() == sorted([names["v2"], names["v3"]])

    kept = (plugin_dir / DRIVER / names["v2"]).stat().st_ino
    with PluginDirWatcher(plugin_dir, [v2, v3]) as watcher:
        back = run_install(plugin_dir, v2)  # a rollback
    assert back.returncode == 0, back.stderr
    assert watcher.problems == []
    assert os.path.dirname(os.readlink(plugin_dir / DRIVER / EXE)) == names["v2"]
    assert (plugin_dir / DRIVER / names["v2"]).stat().st_ino == kept  # not copied again
    assert bundles() == sorted([names["v2"], names["v3"]])


def test_replaces_a_plain_executable_from_an_older_install(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    (plugin_dir / DRIVER).mkdir(parents=True)
    legacy = plugin_dir / DRIVER / EXE
    legacy.write_text("#!/bin/sh\necho '{\"status\":\"Success\"}'\n")  # e.g. the Go original's binary
    legacy.chmod(0o755)
    with PluginDirWatcher(plugin_dir, [bundle]) as watcher:
        result = run_install(plugin_dir, bundle)
    assert result.returncode == 0, result.stderr
    assert watcher.driver_level_events() == [(EXE, IN_MOVED_TO)]
    assert os.path.islink(legacy)
    assert kubelet_init(legacy) == EXPECTED_INIT


def test_a_bundle_that_does_not_run_is_never_switched_to(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    assert run_install(plugin_dir, bundle).returncode == 0
    before = os.readlink(plugin_dir / DRIVER / EXE)
    broken = variant(bundle, tmp_path, "broken")
    for lib in (broken / ".vaulttmpfs-lib").glob("libpython*"):
        lib.unlink()
    with PluginDirWatcher(plugin_dir, [bundle]) as watcher:
        result = run_install(plugin_dir, broken)
    assert result.returncode != 0
    assert "init failed" in result.stderr
    assert watcher.events == [] and watcher.problems == []
    assert os.readlink(plugin_dir / DRIVER / EXE) == before
    assert sorted(p.name for p in plugin_dir.iterdir()) == [".vaulttmpfs-install.lock", DRIVER]
    assert kubelet_init(plugin_dir / DRIVER / EXE) == EXPECTED_INIT


def test_a_damaged_installed_bundle_is_repaired(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    assert run_install(plugin_dir, bundle).returncode == 0
    installed = Path(os.path.realpath(plugin_dir / DRIVER / EXE)).parent
    victim = next(p for p in (installed / ".vaulttmpfs-lib").rglob("*.so*") if p.is_file())
    victim.write_bytes(b"truncated")
    result = run_install(plugin_dir, bundle)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.startswith("unchanged")
    assert tree(Path(os.path.realpath(plugin_dir / DRIVER / EXE)).parent) == tree(bundle)
    assert kubelet_init(plugin_dir / DRIVER / EXE) == EXPECTED_INIT


def test_concurrent_installs_take_turns(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    v2 = variant(bundle, tmp_path, "v2")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: run_install(plugin_dir, s), [bundle, v2, bundle, v2]))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    exe = plugin_dir / DRIVER / EXE
    assert tree(Path(os.path.realpath(exe)).parent) in {tree(bundle), tree(v2)}
    assert kubelet_init(exe) == EXPECTED_INIT
    assert not (plugin_dir / installer.STAGING).exists()


def test_source_that_is_not_a_bundle_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_install(tmp_path / "exec", empty)
    assert result.returncode != 0
    assert "not a vaulttmpfs bundle" in result.stderr
    assert not (tmp_path / "exec" / DRIVER).exists()


def test_plugin_dir_setting_comes_from_the_environment(bundle, tmp_path):
    plugin_dir = tmp_path / "from-env"
    result = subprocess.run([*source_cmd(), "install", "--source", str(bundle)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO),
                                           "VAULTTMPFS_PLUGIN_DIR": str(plugin_dir)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert kubelet_init(plugin_dir / DRIVER / EXE) == EXPECTED_INIT


def test_the_frozen_build_installs_itself_by_default(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    result = run_install(plugin_dir, cmd=[str(bundle / EXE)])
    assert result.returncode == 0, result.stderr
    assert tree(Path(os.path.realpath(plugin_dir / DRIVER / EXE)).parent) == tree(bundle)
    assert run_install(plugin_dir, cmd=[str(plugin_dir / DRIVER / EXE)]).stdout.startswith("unchanged")


def test_the_installed_driver_mounts_and_unmounts(bundle, tmp_path, bao, generator, log_dir):
    plugin_dir = tmp_path / "exec"
    assert run_install(plugin_dir, bundle).returncode == 0
    root = tmp_path / "node"
    root.mkdir()
    env = driver_env(bao, generator, root, log_dir)
    del env["PYTHONPATH"]
    node = Kubelet([str(plugin_dir / DRIVER / EXE)], env, root)
    try:
        reply, path = node.mount(node.new_pod(), {"vault/policies": "nginx"})
        assert reply.ok, reply.body
        accessor = json.loads((path / "vault-token.json").read_text())["wrapped_accessor"]
        assert bao.lookup_accessor(accessor) is not None
        assert node.teardown(path).ok
        assert not is_mount_point(path)
        assert bao.lookup_accessor(accessor) is None
    finally:
        unmount_everything_under(root)


def test_container_entrypoint_installs_then_becomes_the_agent(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    port = free_port()
    env = {"PATH": os.environ["PATH"], "VAULTTMPFS_BUNDLE": str(bundle), "VAULTTMPFS_PLUGIN_DIR": str(plugin_dir),
           "VAULTTMPFS_HEALTH_ADDR": f"127.0.0.1:{port}", "VAULTTMPFS_STATE_DIR": str(tmp_path / "state"),
           "VAULTTMPFS_GENERATOR_TOKEN_PATH": str(tmp_path / "no-token-yet"),
           "VAULTTMPFS_LOG_FILE": str(tmp_path / "agent.log"), "VAULT_ADDR": f"http://127.0.0.1:{free_port()}"}
    proc = subprocess.Popen([str(REPO / "installer" / "entrypoint.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=dies_with_parent())
    try:
        status, body = _wait_for_health(port, proc, lambda b: "last_failure" in b["services"]["generator"])
        # Not bootstrapped yet: the driver is installed, the agent runs and says what is missing.
        assert status == 503 and "vaulttmpfs bootstrap" in body["services"]["generator"]["last_error"]
        assert kubelet_init(plugin_dir / DRIVER / EXE) == EXPECTED_INIT
        proc.send_signal(signal.SIGTERM)  # reaches the agent: the script exec'd it
        assert proc.wait(30) == 0
        assert b"installed: " in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_health(port: int, proc: subprocess.Popen, predicate, timeout: float = 60) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                status, body = resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            status, body = exc.code, json.loads(exc.read())
        except OSError:
            status, body = None, None
        if body is not None and predicate(body):
            return status, body
        time.sleep(0.2)
    raise AssertionError("the agent's health server never gave the expected answer")


def test_the_watcher_catches_a_non_atomic_copy(bundle, tmp_path):
    """Control: the watcher used above does see a partial executable when there is one."""
    plugin_dir = tmp_path / "exec"
    (plugin_dir / DRIVER).mkdir(parents=True)
    with PluginDirWatcher(plugin_dir, [bundle]) as watcher:
        shutil.copytree(bundle / ".vaulttmpfs-lib", plugin_dir / DRIVER / ".vaulttmpfs-lib", symlinks=True)
        data = (bundle / EXE).read_bytes()
        with open(plugin_dir / DRIVER / EXE, "wb") as out:  # what `cp` does: write in place
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(0.3)
            out.write(data[len(data) // 2:])
        os.chmod(plugin_dir / DRIVER / EXE, 0o755)
    assert watcher.problems, "a half-written executable went unnoticed"
    assert any(name == EXE for _, name, _ in watcher.events)


# ---------------------------------------------------------------- who may change what the kubelet runs

def root_only_problems(driver_dir: Path) -> list[str]:
    """Every path the kubelet could exec from, or that leads to it: root-owned, not group/world-writable."""
    problems = []
    for path in [driver_dir, *driver_dir.rglob("*")]:
        info = os.lstat(path)
        if info.st_uid != 0 or (not path.is_symlink() and info.st_mode & 0o022):
            problems.append(f"{path}: uid {info.st_uid} mode {info.st_mode & 0o7777:04o}")
    return problems


@pytest.mark.parametrize("tamper", ["chown -R 65534", "chmod -R go+w"])
def test_install_takes_back_a_bundle_others_could_change(bundle, tmp_path, tamper):
    """Another user who could write the installed bundle could replace what the kubelet runs as root:
    the next install must not call that `unchanged`."""
    plugin_dir = tmp_path / "exec"
    assert run_install(plugin_dir, bundle).returncode == 0
    driver_dir = plugin_dir / DRIVER
    for path in [driver_dir, *driver_dir.rglob("*")]:
        if tamper.startswith("chown"):
            os.lchown(path, 65534, 65534)
        elif not path.is_symlink():
            path.chmod(path.lstat().st_mode & 0o7777 | 0o022)
    assert root_only_problems(driver_dir)
    again = run_install(plugin_dir, bundle)
    assert again.returncode == 0, again.stderr
    assert not again.stdout.startswith("unchanged")
    assert root_only_problems(driver_dir) == []
    assert tree(Path(os.path.realpath(driver_dir / EXE)).parent) == tree(bundle)
    assert kubelet_init(driver_dir / EXE) == EXPECTED_INIT
    assert run_install(plugin_dir, bundle).stdout.startswith("unchanged")  # and now it is


def test_install_refuses_a_plugin_dir_others_can_write(bundle, tmp_path):
    plugin_dir = tmp_path / "exec"
    plugin_dir.mkdir()
    plugin_dir.chmod(0o777)
    result = run_install(plugin_dir, bundle)
    assert result.returncode != 0
    assert f"chmod go-w {plugin_dir}" in result.stderr and "nothing was installed" in result.stderr
    assert not (plugin_dir / DRIVER).exists()
