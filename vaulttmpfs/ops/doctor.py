"""`vaulttmpfs doctor`: a read-only check of this node, one line per check, each FAIL with its fix.

Nothing is written: no mount, no token minted or renewed, no file changed. A check that cannot
run because an earlier one failed says SKIP (the earlier FAIL already makes the exit non-zero).
The settings compared are the driver's (config file + the kubelet's environment when a kubelet
runs here, else this command's) and the agent's (from its health endpoint).
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from .. import trust
from ..config import Config, config_file_path, file_values
from ..engine import bindings, generator, rotate
from ..engine.state import StateStore
from ..errors import DriverError, VaultDenied
from ..flexvolume import broker, relay
from ..vault.client import Vault
from . import install

OK, FAIL, SKIP = "OK", "FAIL", "SKIP"
# What the driver and the agent must agree on, or the agent renews another token, retries another
# queue or talks to another Vault than the driver does.
SHARED = ("vault_addr", "cacert", "capath", "tls_server_name", "namespace", "skip_verify",
          "generator_token_path", "state_dir", "role_name", "policy_bindings", "pods_dir", "agent_socket",
          "broker_socket")
MIN_TTL_LEFT = 300  # a generator token with less left and no successful renewal is about to stop mounts
# Below this the state dir is as good as full: a mount writes ~2 KiB there (its intent and record).
MIN_STATE_FREE, MIN_STATE_INODES = 1 << 20, 64


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}" + (f" -- fix: {self.fix}" if self.fix else "")


class Node:
    """What the checks share: the driver's settings, the agent's report, a Vault client."""

    def __init__(self, env: dict[str, str], env_source: str, health_addr: str | None):
        self.env = env
        self.env_source = env_source
        self.health_addr = health_addr
        self.config: Config | None = None
        self.agent: dict[str, Any] | None = None
        self.agent_error: str | None = None
        self.vault_ok = False
        self.generator_token: str | None = None


def run(env: dict[str, str] | None = None, health_addr: str | None = None,
        kubelet_pid: int | None = None) -> list[Check]:
    env, source = (env, "the given environment") if env is not None else driver_environment(kubelet_pid)
    node = Node(env, source, health_addr)
    checks = [check_config(node)]
    if node.config is None:
        return checks
    for check in (check_driver, check_agent, check_drift, check_vault, check_tls, check_generator,
                  check_role, check_state_dir, check_pending, check_unrecorded, check_socket, check_broker):
        try:
            checks.append(check(node))
        except DriverError as exc:  # a check's own unexpected refusal is its FAIL, not a crash
            checks.append(Check(check.__name__.removeprefix("check_"), FAIL, str(exc)))
    return checks


def driver_environment(kubelet_pid: int | None = None) -> tuple[dict[str, str], str]:
    """The kubelet's environment when a kubelet runs on this node (that is what the driver gets).

    Only a process root runs counts: any node user can start a program called `kubelet`, and this
    root command would then send the generator token to its VAULT_ADDR and run its plugin dir's driver."""
    pids = [str(kubelet_pid)] if kubelet_pid else [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        try:
            env = _root_process_environment(pid, None if kubelet_pid else "kubelet")
        except OSError as exc:
            if kubelet_pid:
                raise DriverError(f"cannot read the environment of pid {pid}: {exc.strerror}") from None
            continue
        except DriverError:
            if kubelet_pid:
                raise
            continue
        if env is not None:
            return env, f"the kubelet's environment (pid {pid})"
    return dict(os.environ), "this command's environment (no kubelet process found)"


def _root_process_environment(pid: str, named: str | None) -> dict[str, str] | None:
    """pid's environment; None if it is not called `named`; DriverError if root does not run it.
    Read through one open /proc/<pid>: a pid that exits and is reused meanwhile reads as gone (ESRCH)."""
    proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if named and _read_at(proc, "comm").strip() != named.encode():
            return None
        uids = next((line.split()[1:] for line in _read_at(proc, "status").splitlines()
                     if line.startswith(b"Uid:")), [b"?"])
        if any(uid != b"0" for uid in uids):
            raise DriverError(f"pid {pid} does not run as root (uids {b' '.join(uids).decode()}): its environment "
                              "is not the kubelet's, and this command will not take settings from it")
        pairs = _read_at(proc, "environ").split(b"\0")
    finally:
        os.close(proc)
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def _read_at(directory: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_config(node: Node) -> Check:
    path = config_file_path(node.env)
    try:
        values = file_values(path)
        node.config = Config.from_env(node.env)
    except DriverError as exc:
        return Check("config", FAIL, str(exc), f"correct {path} or the variable named")
    overridden = sorted(k for k in values if node.env.get(k) and node.env[k] != values[k])
    where = f"{path} ({len(values)} settings)" if os.path.exists(path) else f"no {path}"
    note = f"; overridden by the environment: {', '.join(overridden)}" if overridden else ""
    return Check("config", OK, f"{where} + {node.env_source}{note}")


def check_driver(node: Node) -> Check:
    exe = os.path.join(node.config.plugin_dir, install.DRIVER_DIR, install.EXE)
    fix = f"install it: `vaulttmpfs install --plugin-dir {node.config.plugin_dir}` (the DaemonSet does it at start)"
    if not os.path.exists(exe):
        return Check("driver", FAIL, f"no driver at {exe}, where the kubelet looks (VAULTTMPFS_PLUGIN_DIR)", fix)
    try:
        _refuse_untrusted_driver(exe)  # run as root below, as the kubelet would
        install.verify(exe)
    except DriverError as exc:
        return Check("driver", FAIL, str(exc), fix)
    bundle = install.current_bundle(os.path.dirname(exe)) or "not a bundle link"
    return Check("driver", OK, f"{exe} answers init ({bundle})")


def _refuse_untrusted_driver(exe: str) -> None:
    fd = trust.open_file(exe, "the driver")
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != 0 or info.st_mode & 0o022:
        raise DriverError(f"the driver {exe} is not root's alone (owner uid {info.st_uid}, mode "
                          f"{stat.S_IMODE(info.st_mode):04o}): not run; reinstall it with `vaulttmpfs install`")


def check_agent(node: Node) -> Check:
    addr = node.health_addr
    fix = "start the node agent (the DaemonSet's pod; `kubectl -n vaulttmpfs get pods -o wide`) and read its log"
    if not addr:
        node.agent_error = "no health address"
        return Check("agent", SKIP, "no agent health address given (--health-addr)")
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=5) as resp:
            code, body = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        code, body = exc.code, _json(exc.read())
    except (OSError, ValueError) as exc:
        node.agent_error = str(exc)
        return Check("agent", FAIL, f"no answer from the agent's health endpoint http://{addr}/healthz: "
                                    f"{getattr(exc, 'reason', exc)}", fix)
    node.agent = body
    if code != 200:
        errors = {name: s.get("last_error") for name, s in (body.get("services") or {}).items()
                  if isinstance(s, dict) and s.get("last_error")}
        return Check("agent", FAIL, f"http://{addr}/healthz answers {code}: {errors or body}", fix)
    return Check("agent", OK, f"http://{addr}/healthz answers 200 ({', '.join(sorted(body.get('services') or {}))})")


def check_drift(node: Node) -> Check:
    if node.agent is None:
        return Check("settings", SKIP, "the agent did not answer: its settings cannot be compared")
    theirs = node.agent.get("settings")
    if not isinstance(theirs, dict):
        return Check("settings", FAIL, "the agent does not report its settings (an older agent?)",
                     "upgrade the DaemonSet to this version")
    ours = node.config.public()
    drift = [f"{name}: driver {ours.get(name)!r}, agent {theirs.get(name)!r}"
             for name in SHARED if ours.get(name) != theirs.get(name)]
    if drift:
        return Check("settings", FAIL, "the driver and the agent see different settings: " + "; ".join(drift),
                     f"set them in one place, the config file {config_file_path(node.env)} (the DaemonSet's "
                     f"ConfigMap), and remove them from {node.env_source.split(' (')[0]}")
    return Check("settings", OK, f"the driver and the agent agree on {', '.join(SHARED)}")


def _vault(node: Node, token: str | None):
    return Vault(node.config, token)


def check_vault(node: Node) -> Check:
    config = node.config
    fix = f"check VAULT_ADDR={config.vault_addr} and that Vault is up and unsealed, from this node"
    try:
        health = _vault(node, None).health()
    except DriverError as exc:
        return Check("vault", FAIL, str(exc), fix)
    if health.get("sealed") or not health.get("initialized", True):
        return Check("vault", FAIL, f"Vault at {config.vault_addr} is sealed or not initialized", "unseal it")
    node.vault_ok = True
    return Check("vault", OK, f"{config.vault_addr} answers (version {health.get('version', '?')})")


def check_tls(node: Node) -> Check:
    config = node.config
    if config.skip_verify:
        return Check("tls", FAIL, "VAULT_SKIP_VERIFY is set: Vault's certificate is not verified",
                     "unset VAULT_SKIP_VERIFY and VAULTTMPFS_ALLOW_INSECURE; give Vault's CA with VAULT_CACERT")
    if config.vault_addr.startswith("http://"):
        host = config.vault_addr[7:].split("/")[0].rsplit(":", 1)[0].strip("[]")
        if host in ("127.0.0.1", "::1", "localhost"):
            return Check("tls", OK, "plain http, but to this node's loopback")
        return Check("tls", FAIL, f"VAULT_ADDR={config.vault_addr} is plain http: tokens cross the network in clear",
                     "use https:// and Vault's CA in VAULT_CACERT")
    ca = config.cacert or config.capath or "the system CAs"
    return Check("tls", OK, f"https, certificate verified against {ca}"
                            + (f", server name {config.tls_server_name}" if config.tls_server_name else ""))


def check_generator(node: Node) -> Check:
    path = node.config.generator_token_path
    try:
        token = generator.read_token(path)
    except DriverError as exc:
        return Check("generator", FAIL, str(exc), _bootstrap_fix(node))
    info = os.stat(path)
    facts = f"{path} (uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})"
    if not node.vault_ok:
        return Check("generator", SKIP, f"{facts}; Vault unreachable, token not looked up")
    node.generator_token = token
    try:
        data = _vault(node, token).lookup_self()
    except VaultDenied as exc:
        return Check("generator", FAIL, f"{facts}: Vault refuses it ({exc})", _bootstrap_fix(node))
    except DriverError as exc:
        return Check("generator", FAIL, f"{facts}: {exc}", "see the vault check")
    policies = sorted(data.get("policies") or [])
    ttl = int(data.get("ttl") or 0)
    facts += f": accessor {str(data.get('accessor', ''))[:8]}, policies {','.join(policies)}, " + \
        (f"{ttl}s left" if ttl else "no expiry")
    if "root" in policies:
        return Check("generator", FAIL, facts + ": a root token", _bootstrap_fix(node))
    if ttl and ttl < MIN_TTL_LEFT:
        return Check("generator", FAIL, facts + ": about to expire", "is the agent renewing it? see the agent check")
    return Check("generator", OK, facts)


def _bootstrap_fix(node: Node) -> str:
    if node.config.auth_role:
        return f"the agent logs in again by itself (role {node.config.auth_role}); see its log"
    return "run `vaulttmpfs bootstrap` on this node"


def check_role(node: Node) -> Check:
    role = node.config.role_name
    if node.generator_token is None:
        return Check("role", SKIP, f"role {role} not read: no usable generator token")
    try:
        data = _vault(node, node.generator_token).read_token_role(role)
    except VaultDenied as exc:
        return Check("role", FAIL, f"the generator token may not read auth/token/roles/{role}: {exc}",
                     f"add `path \"auth/token/roles/{role}\" {{ capabilities = [\"read\"] }}` to the token_generator "
                     "policy (policies/token_generator_policy.hcl)")
    if data is None:
        return Check("role", FAIL, f"token role {role} does not exist: every mount will fail",
                     "create it: `vaulttmpfs bootstrap --setup-vault` or policies/applications_role.sh")
    allowed = set(data.get("allowed_policies") or [])
    missing = _bound_but_not_allowed(node.config, allowed, set(data.get("disallowed_policies") or []),
                                     data.get("allowed_policies_glob") or [])
    if missing:
        return Check("role", FAIL, f"the policy bindings allow {', '.join(missing)} but token role {role} does not: "
                                   "those pods are admitted and then refused by Vault",
                     f"add them to allowed_policies of auth/token/roles/{role}, or remove them from the bindings")
    return Check("role", OK, f"token role {role} exists, allows {', '.join(sorted(allowed)) or 'any policy'}")


def _bound_but_not_allowed(config: Config, allowed: set, disallowed: set, globs: list) -> list[str]:
    if not config.policy_bindings:
        return []

    wanted = {p for rule in bindings.load(config.policy_bindings).rules for p in rule.policies
              if "*" not in p and "{" not in p}  # patterns depend on the pod: only literals are checked
    return sorted(p for p in wanted if p in disallowed or
                  (allowed and p not in allowed and not any(fnmatch.fnmatchcase(p, g) for g in globs)))


def check_state_dir(node: Node) -> Check:
    path = node.config.state_dir
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return Check("state", OK, f"{path} does not exist yet (made 0700 at the first mount)")
    fix = f"chown root:root {path} && chmod 700 {path}"
    if not stat.S_ISDIR(info.st_mode):
        return Check("state", FAIL, f"{path} is not a directory (a symlink?)", f"remove it; {fix}")
    if info.st_uid != 0 or info.st_mode & 0o077:
        return Check("state", FAIL, f"{path} is owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}: "
                                    "others could read accessors or forge records", fix)

    try:
        trust.check_dirs(path, f"state dir {path}", strict_leaf=False)  # as given: the dirs holding symlinks too
    except DriverError as exc:
        detail, _, fix = str(exc).partition("; fix it with: ")
        parent = os.path.dirname(os.path.abspath(path))
        return Check("state", FAIL, detail, fix or f"chown root {parent} && chmod go-w {parent}")
    try:
        room = os.statvfs(path)
    except OSError as exc:
        return Check("state", FAIL, f"cannot tell how much room {path} has: {exc.strerror}")
    free = room.f_bavail * room.f_frsize
    if room.f_flag & os.ST_RDONLY:
        return Check("state", FAIL, f"{path} is on a read-only filesystem: every mount fails at the volume's lock",
                     f"remount the filesystem holding {path} read-write")
    if free < MIN_STATE_FREE or (room.f_files and room.f_favail < MIN_STATE_INODES):
        return Check("state", FAIL, f"{path}'s filesystem is full ({free // 1024} KiB, {room.f_favail} inodes free): "
                                    "mounts fail before minting, and an unmount cannot queue a revocation Vault "
                                    "did not take", f"free space on the filesystem holding {path}")
    return Check("state", OK, f"{path} root-only (0{stat.S_IMODE(info.st_mode):o}), {free // 2**20} MiB free")


def check_pending(node: Node) -> Check:
    queue = StateStore(node.config.state_dir).list_pending()
    pending = [p for p in queue if not rotate.held_back(p)]  # a rotation's grace is not a failure
    if not pending:
        waiting = len(queue) - len(pending)
        return Check("revocations", OK, "none pending" + (f"; {waiting} old token(s) a rotation keeps until the "
                                                          "pod takes its new one or the grace ends" if waiting else ""))
    oldest = time.time() - min(float(p.get("since") or time.time()) for p in pending)
    return Check("revocations", FAIL, f"{len(pending)} pod token(s) still to revoke (oldest {oldest:.0f}s): "
                                      f"{pending[0].get('error') or pending[0].get('why', '')}",
                 "the agent retries them; make Vault reachable and run `vaulttmpfs retry-revocations`")


def check_unrecorded(node: Node) -> Check:
    from ..engine import intents

    found = intents.summary(StateStore(node.config.state_dir))
    if not found["count"]:
        return Check("unrecorded", OK, "no create lost its answer")
    return Check("unrecorded", FAIL,
                 f"{found['count']} token create(s) lost their answer after Vault may have acted: up to that many "
                 f"tokens are alive that nothing can revoke (accessor unknown), until {intents.iso(found['until'])} "
                 "at the latest (`vaulttmpfs status`)",
                 "nothing to do but wait (they expire with the token role's period); to shorten that bound, lower "
                 "the role's token_period / token_explicit_max_ttl (docs/vault-cluster.md), and look for the "
                 "gateway or timeout that loses answers")


def check_socket(node: Node) -> Check:
    path = node.config.agent_socket
    relaying = bool(node.agent and "relay" in (node.agent.get("services") or {}))
    if not relaying and not os.path.exists(path):
        return Check("socket", OK, f"no relay at {path}: the driver mounts by itself")
    try:
        relay._connect(path).close()
    except (OSError, relay.Refused) as exc:
        fix = ("restart the agent with --relay" if relaying else
               f"remove the stale socket {path}, or run the agent with --relay")
        return Check("socket", FAIL, f"relay socket {path} does not answer: {exc}", fix)
    return Check("socket", OK, f"{path} answers, served by root")


def check_broker(node: Node) -> Check:
    """The plain DaemonSet's fast path: the driver's Vault calls made by the agent (flexvolume.broker)."""
    path = node.config.broker_socket
    brokering = bool(node.agent and "broker" in (node.agent.get("services") or {}))
    if not brokering and not os.path.exists(path):
        return Check("broker", OK, f"no broker at {path}: each driver call talks to Vault itself (the slower "
                     "standalone fallback; the plain DaemonSet runs the agent with --broker)")
    try:
        relay._connect(path, broker.BANNER).close()
    except (OSError, relay.Refused) as exc:
        fix = ("restart the agent (it runs with --broker)" if brokering else
               f"remove the stale socket {path}, or run the agent with --broker")
        return Check("broker", FAIL, f"broker socket {path} does not answer: {exc or type(exc).__name__}; "
                     "driver calls fall back to standalone", fix)
    return Check("broker", OK, f"{path} answers, served by root: the driver's Vault calls go through the agent")


def _json(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def report(checks: list[Check]) -> dict[str, Any]:
    return {"ok": all(c.status != FAIL for c in checks), "checks": [asdict(c) for c in checks]}
