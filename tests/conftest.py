"""Shared fixtures: a real OpenBao dev server, a generator token, and a kubelet stand-in that execs
the driver (from source, and the PyInstaller build) with real tmpfs mounts under a temp root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# Children are forked with a preexec_fn (vaultserver.dies_with_parent) while CSI tests hold gRPC channels
# in this process: gRPC's fork handlers then run in the child before its exec and can crash it (seen:
# SIGSEGV/SIGABRT "epoll_wait error: Bad file descriptor"). The children exec at once and never use this
# process's gRPC, so the handlers are not wanted. Set before any test module imports grpc.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

from . import idmap, otheruser
from .faultserver import FaultServer
from .kubelet import Kubelet
from .pki import issue, make_ca
from .raftcluster import RaftCluster
from .vaultserver import REPO, VaultServer, free_port

BUILD_EXE = Path(os.environ.get("VAULTTMPFS_BUILD_EXE", REPO / "dist" / "vaulttmpfs" / "vaulttmpfs"))
# Every token value a test sees; test_zz_leaks checks none of them reached a log file.
SEEN_SECRETS: set[str] = set()


IN_PROCESS = {"test_engine_unit.py"}  # the engine over test doubles: no root, tmpfs or OpenBao needed


def pytest_configure(config):
    config.addinivalue_line("markers", f"{otheruser.MARK}: acts as another user (tests/otheruser.py)")


def pytest_collection_modifyitems(config, items):
    # Up front, in one line: else every fsGroup mount fails later with a bare EINVAL.
    if any(item.path.name not in IN_PROCESS for item in items) and (why := idmap.problem()):
        raise pytest.UsageError(f"the suite cannot run here: {why}")


@pytest.fixture(scope="session")
def bao():
    with VaultServer() as server:
        server.setup_driver()
        SEEN_SECRETS.add(server.root_token)
        yield server


@pytest.fixture(scope="module")
def raft():
    """A real 3-node OpenBao Raft cluster (tests/raftcluster.py), set up for the driver, per module."""
    with RaftCluster() as cluster:
        cluster.leader().setup_driver()
        yield cluster


@pytest.fixture
def cluster(raft):
    raft.heal()  # a node a test killed is back, a standby
    return raft


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("driver-logs")


@pytest.fixture(scope="session")
def generator(bao, tmp_path_factory) -> dict:
    """A generator token (policy token_generator only) in a 0600 file."""
    auth = bao.generator_token(ttl="2h")
    path = token_file(tmp_path_factory.mktemp("generator"), auth["client_token"])
    yield {"token": auth["client_token"], "accessor": auth["accessor"], "path": path}
    bao.revoke_token(auth["client_token"])


def make_pki(directory: Path) -> None:
    make_ca(directory, "ca")
    issue(directory, "server", "ca", "/CN=vault.test", san="IP:127.0.0.1")
    issue(directory, "client", "ca", "/CN=node-1")


@pytest.fixture(scope="module")
def mtls_bao(tmp_path_factory):
    """A second OpenBao, behind a TLS listener that requires client certificates (openssl-made PKI)."""
    pki = tmp_path_factory.mktemp("pki")
    make_pki(pki)
    port = free_port()
    (pki / "listener.hcl").write_text(f'''
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{pki}/server.pem"
  tls_key_file = "{pki}/server.key"
  tls_client_ca_file = "{pki}/ca.pem"
  tls_require_and_verify_client_cert = true
}}
''')
    with VaultServer(extra_args=[f"-config={pki / 'listener.hcl'}"]) as server:
        server.setup_driver()
        generator = {"path": token_file(pki, server.generator_token()["client_token"])}
        yield {"server": server, "pki": pki, "addr": f"https://127.0.0.1:{port}", "generator": generator}


@pytest.fixture
def fault(bao):
    """A loopback server in front of the real OpenBao that misbehaves on demand (tests/faultserver.py)."""
    with FaultServer(bao.addr) as server:
        yield server


@pytest.fixture
def faulty(kubelet, fault):
    """The kubelet stand-in whose driver reaches Vault through `fault`."""
    kubelet.env["VAULT_ADDR"] = fault.addr
    return kubelet


def source_cmd() -> list[str]:
    return [sys.executable, "-m", "vaulttmpfs"]


def build_cmd() -> list[str]:
    if not os.access(BUILD_EXE, os.X_OK):
        pytest.fail(f"no PyInstaller build at {BUILD_EXE}: run `make build` first (make test does)")
    return [str(BUILD_EXE)]


@pytest.fixture(scope="session", params=["source", "build"])
def driver_cmd(request) -> list[str]:
    return source_cmd() if request.param == "source" else build_cmd()


def on_source_and_build(check) -> None:
    """check(kind, driver_cmd) for the source tree and the build at the same time: for tests whose
    time goes into waiting (a token's period, a deadline), not into work. Either one's failure is
    raised here. A child started in check() must end there: dies_with_parent kills it with its thread."""
    with ThreadPoolExecutor(2) as pool:
        runs = {kind: pool.submit(check, kind, cmd) for kind, cmd in (("source", source_cmd()), ("build", build_cmd()))}
        for kind, run in runs.items():
            try:
                run.result()
            except BaseException as exc:
                exc.add_note(f"(the {kind} driver)")
                raise


def driver_env(bao: VaultServer, generator: dict, root: Path, log_dir: Path, **extra: str) -> dict[str, str]:
    """The kubelet's environment plus our settings; nothing inherited from the test runner's Vault vars."""
    state = root / "state"
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": str(REPO),
        "VAULT_ADDR": bao.addr,
        "VAULTTMPFS_GENERATOR_TOKEN_PATH": generator["path"],
        "VAULTTMPFS_STATE_DIR": str(state),
        "VAULTTMPFS_LOG_FILE": str(log_dir / f"{root.name}.log"),
        "VAULTTMPFS_PODS_DIR": str(root / "var/lib/kubelet/pods"),  # the Kubelet harness's layout
        # Per node: an agent relaying on this machine's default socket must not serve the tests.
        "VAULTTMPFS_AGENT_SOCKET": str(root / "run/vaulttmpfs/agent.sock"),
        "VAULTTMPFS_BROKER_SOCKET": str(root / "run/vaulttmpfs/broker.sock"),
        "VAULT_MAX_RETRIES": "1",
        "VAULT_CLIENT_TIMEOUT": "3s",
        "VAULTTMPFS_METRICS_ADDR": "",  # an agent's /metrics is off unless a test asks (no fixed port clash)
        "VAULTTMPFS_CONFIG_FILE": str(root / "etc/vaulttmpfs/config.env"),  # not the machine's
    }
    env.update(extra)
    return env


@pytest.fixture
def kubelet(bao, generator, driver_cmd, tmp_path, log_dir):
    root = tmp_path / "node"
    root.mkdir()
    node = Kubelet(driver_cmd, driver_env(bao, generator, root, log_dir), root)
    yield node
    unmount_everything_under(root)


def unmount_everything_under(root: Path) -> None:
    """A failed test must not leave tmpfs mounts behind on the machine."""
    prefix = os.path.realpath(root) + "/"
    targets = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split()[4].startswith(prefix)]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)


def remember_secret(value: str) -> str:
    SEEN_SECRETS.add(value)
    return value


def generator_file(bao, path: Path, **params) -> dict:
    """A fresh generator token (`bao.generator_token(**params)`) written to `path` 0600; its auth."""
    auth = bao.generator_token(**params)
    remember_secret(auth["client_token"])
    path.write_text(auth["client_token"] + "\n")
    path.chmod(0o600)
    return auth


def write_config(path: Path, values: dict[str, str], mode: int = 0o644) -> None:
    """A node's config file as `install --config-from` writes it (root's, in a 0755 dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    path.write_text("# installed from the ConfigMap\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(mode)


def token_file(directory: Path, token: str) -> str:
    """A generator token file as bootstrap writes it (0600, the driver's uid); its path."""
    path = directory / f"generator-{len(list(directory.glob('generator-*')))}"
    path.write_text(remember_secret(token) + "\n")
    path.chmod(0o600)
    return str(path)


def eventually(predicate, what: str, timeout: float = 30.0, step: float = 0.1):
    """PREDICATE's first truthy answer, asked every STEP seconds; AssertionError naming WHAT after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
