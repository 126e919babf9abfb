"""Settings, read once from the environment the kubelet passes us.

Names match the Go original (and Vault's own CLI) so vaulttmpfs is a drop-in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import DriverError

_DURATION = re.compile(r"(\d+)(h|m|s|ms)?")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, None: 1}
_TRUE = {"1", "t", "true", "yes", "on"}
_FALSE = {"", "0", "f", "false", "no", "off"}
# A role or file name becomes part of a Vault path or a file path: one plain segment only.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def parse_duration(text: str, setting: str) -> float:
    """Vault/Go style duration ("5m", "90s", "1h30m", "300") to seconds."""
    text = text.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION.match(text, pos)
        if not match:
            break
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise DriverError(f"{setting}={text!r} is not a duration (examples: 300, 90s, 5m, 1h)")
    return total


def parse_bool(text: str, setting: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise DriverError(f"{setting}={text!r} is not a boolean (use true or false)")


def safe_name(text: str, setting: str) -> str:
    if not SAFE_NAME.fullmatch(text) or text in {".", ".."}:
        raise DriverError(
            f"{setting}={text!r} must be a plain name (letters, digits, '.', '_', '-'; no '/' or '..')"
        )
    return text


@dataclass(frozen=True)
class Config:
    generator_token_path: str = "/etc/vaulttmpfs/vaulttoken"  # a dir of its own: mount only it
    token_filename: str = "vault-token"
    role_name: str = "applications"
    vault_addr: str = "https://127.0.0.1:8200"
    cacert: str | None = None
    capath: str | None = None
    skip_verify: bool = False
    tls_server_name: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    namespace: str | None = None
    wrap_ttl: str = "5m"
    max_retries: int = 2
    timeout: float = 10.0
    state_dir: str = "/var/lib/vaulttmpfs"
    log_file: str = "/var/log/vaulttmpfs.log"
    tmpfs_size: str = "1m"
    agent_socket: str = "/run/vaulttmpfs/agent.sock"
    node_name: str = ""
    allow_insecure: bool = False  # VAULT_SKIP_VERIFY is refused unless this is set
    pods_dir: str = "/var/lib/kubelet/pods"  # the kubelet's (--root-dir)/pods: mount dirs must be below it
    policy_bindings: str | None = None  # which namespaces/service accounts may ask for which policies

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Config":
        env = os.environ if env is None else env
        get = lambda name, default=None: env.get(name) or default  # noqa: E731
        wrap_ttl = get("VAULT_WRAP_TTL", cls.wrap_ttl)
        if parse_duration(wrap_ttl, "VAULT_WRAP_TTL") <= 0:
            raise DriverError(f"VAULT_WRAP_TTL={wrap_ttl!r} must be positive")
        # VAULT_MAX_RETRIES is Vault's name; the original documented VAULT_MAX_RETRY.
        retries_text = get("VAULT_MAX_RETRIES", get("VAULT_MAX_RETRY", str(cls.max_retries)))
        try:
            max_retries = max(0, int(retries_text))
        except ValueError:
            raise DriverError(f"VAULT_MAX_RETRIES={retries_text!r} is not an integer") from None
        timeout = parse_duration(get("VAULT_CLIENT_TIMEOUT", "10s"), "VAULT_CLIENT_TIMEOUT")
        return cls(
            generator_token_path=get("VAULTTMPFS_GENERATOR_TOKEN_PATH", cls.generator_token_path),
            token_filename=safe_name(
                get("VAULTTMPFS_TOKEN_FILENAME", cls.token_filename), "VAULTTMPFS_TOKEN_FILENAME"
            ),
            role_name=safe_name(get("VAULTTMPFS_ROLE_NAME", cls.role_name), "VAULTTMPFS_ROLE_NAME"),
            vault_addr=get("VAULT_ADDR", cls.vault_addr).rstrip("/"),
            cacert=get("VAULT_CACERT"),
            capath=get("VAULT_CAPATH"),
            skip_verify=parse_bool(get("VAULT_SKIP_VERIFY", ""), "VAULT_SKIP_VERIFY"),
            tls_server_name=get("VAULT_TLS_SERVER_NAME"),
            client_cert=get("VAULT_CLIENT_CERT"),
            client_key=get("VAULT_CLIENT_KEY"),
            namespace=get("VAULT_NAMESPACE"),
            wrap_ttl=wrap_ttl,
            max_retries=max_retries,
            timeout=timeout if timeout > 0 else cls.timeout,
            state_dir=get("VAULTTMPFS_STATE_DIR", cls.state_dir),
            log_file=get("VAULTTMPFS_LOG_FILE", cls.log_file),
            tmpfs_size=get("VAULTTMPFS_TMPFS_SIZE", cls.tmpfs_size),
            agent_socket=get("VAULTTMPFS_AGENT_SOCKET", cls.agent_socket),
            node_name=get("VAULTTMPFS_NODE_NAME", get("NODE_NAME", os.uname().nodename)),
            allow_insecure=parse_bool(get("VAULTTMPFS_ALLOW_INSECURE", ""), "VAULTTMPFS_ALLOW_INSECURE"),
            pods_dir=get("VAULTTMPFS_PODS_DIR", cls.pods_dir),
            policy_bindings=get("VAULTTMPFS_POLICY_BINDINGS"),
        )
