"""Settings, read once: the root-owned config file the DaemonSet installs, overridden by the environment.

Names match the Go original (and Vault's own CLI) so vaulttmpfs is a drop-in: a kubelet drop-in
that sets them keeps working, and wins over the file. The file (VAULTTMPFS_CONFIG_FILE, default
/etc/vaulttmpfs/config/config.env) holds the same names as KEY=VALUE lines; it decides where tokens go,
so it is read only when root owns it and its directories and nobody else can write them (sshd's rule).
"""

from __future__ import annotations

import os
import stat

from . import trust
from .errors import DriverError
from .value import Value

# The settings' small grammars are read by hand, not with re: re (and enum under it) is ~4 ms of every
# kubelet call, which reads them all (docs/performance-flexvolume.md). Each names the pattern it reads.
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, None: 1}
_TRUE = {"1", "t", "true", "yes", "on"}
_FALSE = {"", "0", "f", "false", "no", "off"}
# A role or file name becomes part of a Vault path or a file path: one plain segment only.
SAFE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _ALNUM | frozenset("._-")


def is_safe_name(text: str) -> bool:
    """SAFE_NAME_PATTERN.fullmatch(text)."""
    return 0 < len(text) <= 128 and text[0] in _ALNUM and all(c in _NAME_CHARS for c in text)


def __getattr__(name: str):
    # SAFE_NAME, the compiled pattern, for the operator commands (cli): compiled on first use only.
    if name == "SAFE_NAME":
        import re

        globals()["SAFE_NAME"] = found = re.compile(SAFE_NAME_PATTERN)
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _digits(text: str, pos: int) -> int:
    """The end of the run of decimal digits (re's \\d) at `pos`."""
    while pos < len(text) and text[pos].isdecimal():
        pos += 1
    return pos


def parse_duration(text: str, setting: str) -> float:
    """Vault/Go style duration ("5m", "90s", "1h30m", "300") to seconds: (\\d+(?:\\.\\d+)?)(ms|h|m|s)?, repeated."""
    text = text.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        end = _digits(text, pos)
        if end == pos:
            break
        if text.startswith(".", end) and _digits(text, end + 1) > end + 1:
            end = _digits(text, end + 1)
        number, pos = float(text[pos:end]), end
        # "ms" before "m": 1500ms is not 1500 minutes.
        unit = "ms" if text.startswith("ms", pos) else text[pos] if pos < len(text) and text[pos] in "hms" else None
        total += number * _UNIT_SECONDS[unit]
        pos += len(unit or "")
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
    if not is_safe_name(text) or text in {".", ".."}:
        raise DriverError(
            f"{setting}={text!r} must be a plain name (letters, digits, '.', '_', '-'; no '/' or '..')"
        )
    return text


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
# A page at least; a token, its metadata and a CA bundle need far less than the top.
TMPFS_SIZE_RANGE = (4 << 10, 64 << 20)
MAX_RETRIES_RANGE = (0, 10)
TIMEOUT_RANGE = (0.1, 300.0)  # seconds; the kubelet waits for us with no timeout of its own
WRITE_BUDGET_RANGE = (1, 256)


def parse_size(text: str, setting: str, low: int, high: int) -> str:
    """A tmpfs size (bytes, or with k/m/g: what tmpfs's size= takes, no %: bounded here) within [low, high];
    returned as given. (\\d+)([kmg]?), case-insensitive."""
    stripped = text.strip()
    end = _digits(stripped, 0)
    unit = stripped[end:].lower()
    if not end or unit not in _SIZE_UNITS:
        raise DriverError(f"{setting}={text!r} is not a size (examples: 64k, 1m)")
    size = int(stripped[:end]) * _SIZE_UNITS[unit]
    if not low <= size <= high:
        raise DriverError(f"{setting}={text!r} is outside {low >> 10}k..{high >> 20}m")
    return text.strip()


def in_range(value: float, setting: str, text: str, low: float, high: float) -> float:
    if not low <= value <= high:
        raise DriverError(f"{setting}={text!r} is outside {low:g}..{high:g}")
    return value


CONFIG_FILE_ENV = "VAULTTMPFS_CONFIG_FILE"
DEFAULT_CONFIG_FILE = "/etc/vaulttmpfs/config/config.env"
MAX_CONFIG_BYTES = 64 * 1024
_NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_REST = _NAME_START | frozenset("0123456789")
# Which names a config file may set: ours and Vault's, never a credential.
_FILE_PREFIXES = ("VAULT_", "VAULTTMPFS_")
_FILE_NAMES = {"NODE_NAME"}
_NOT_IN_FILE = {"VAULT_TOKEN", CONFIG_FILE_ENV}
_file_cache: dict[str, tuple[tuple, dict[str, str]]] = {}


def config_file_path(env=None) -> str:
    env = os.environ if env is None else env
    return env.get(CONFIG_FILE_ENV) or DEFAULT_CONFIG_FILE


def file_values(path: str) -> dict[str, str]:
    """The config file's settings ({} when there is none); a DriverError when it is untrusted or malformed.

    Parsed once per process and version of the file (the agent sees an edited file at its next call).
    """
    try:
        handle = _open_trusted(path)
    except FileNotFoundError:
        return {}  # but a missing file under a dir others can change was refused: they could have moved it
    with handle:
        info = os.fstat(handle.fileno())
        identity = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        cached = _file_cache.get(path)
        if cached and cached[0] == identity:
            return cached[1]
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise DriverError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    values = parse_config_text(data.decode("utf-8", errors="replace"), path)
    _file_cache[path] = (identity, values)
    return values


def check_trusted(path: str) -> None:
    """Root-owned and writable by root only: the file and every directory and symlink on the way to it
    (sshd's rule, see trust.py); a DriverError saying which and how to fix it otherwise."""
    try:
        _open_trusted(path).close()
    except FileNotFoundError:
        raise DriverError(f"config file {path} does not exist") from None


def _open_trusted(path: str):
    """The file opened for reading once trusted; FileNotFoundError when there is none."""

    try:
        fd = trust.open_file(path, f"config file {path}", os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DriverError(f"cannot read config file {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DriverError(f"config file {path} is not a regular file")
    if info.st_uid != 0 or info.st_mode & 0o022:
        os.close(fd)
        raise DriverError(f"config file {path} must be owned by root and not group/world-writable (owner uid "
                          f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}); fix it with: "
                          f"chown root:root {path} && chmod 644 {path}")
    return os.fdopen(fd, "rb")


def parse_config_text(text: str, source: str = "config file") -> dict[str, str]:
    """KEY=VALUE lines (as in an env file or a systemd EnvironmentFile); `#` comments; quotes optional."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        found = _assignment(line)
        if not found:
            raise DriverError(f"{source} line {number}: expected NAME=VALUE, got {line[:60]!r}")
        name, value = found[0], found[1].strip()
        if not (name.startswith(_FILE_PREFIXES) or name in _FILE_NAMES) or name in _NOT_IN_FILE:
            raise DriverError(f"{source} line {number}: {name} is not a vaulttmpfs setting "
                              "(VAULT_* and VAULTTMPFS_* only; never VAULT_TOKEN)")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if name in values:
            raise DriverError(f"{source} line {number}: {name} is set twice")
        values[name] = value
    return values


def _assignment(line: str) -> tuple[str, str] | None:
    """(name, value) of `(?:export\\s+)?([A-Z_][A-Z0-9_]*)\\s*=\\s*(.*)` matching the whole line, else None."""
    after = line[6:].lstrip() if line.startswith("export") and line[6:7].isspace() else None
    return (after is not None and _name_and_value(after)) or _name_and_value(line)


def _name_and_value(text: str) -> tuple[str, str] | None:
    end = 0
    while end < len(text) and text[end] in (_NAME_REST if end else _NAME_START):
        end += 1
    rest = text[end:].lstrip()
    if not end or not rest.startswith("="):
        return None
    return text[:end], rest[1:].lstrip()


def settings(env=None) -> dict[str, str]:
    """Every setting as the driver sees it: the config file, then the environment's non-empty values on top."""
    env = os.environ if env is None else env
    merged = dict(file_values(config_file_path(env)))
    merged.update((k, v) for k, v in env.items() if v)
    return merged


def setting(name: str, default: str | None = None, env=None) -> str | None:
    return settings(env).get(name) or default


def load(env=None) -> tuple["Config", Exception | None]:
    """A call's settings, the config file read once: (config, None); when they are invalid,
    (`Config.fallback` of what could be read, the error the call answers with)."""
    env = os.environ if env is None else env
    try:
        values = settings(env)
    except (DriverError, OSError) as exc:
        return Config.fallback({k: v for k, v in env.items() if v}), exc
    try:
        return Config.from_settings(values), None
    except DriverError as exc:
        return Config.fallback(values), exc


class Config(Value):  # a Value, not a dataclass: see value.py (~4 ms of every kubelet call)
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
    # The agent's Vault writes in flight at once (creates, revocations, renewals), whatever asks for them.
    vault_write_budget: int = 4
    state_dir: str = "/var/lib/vaulttmpfs"
    log_file: str = "/var/log/vaulttmpfs.log"
    tmpfs_size: str = "1m"
    agent_socket: str = "/run/vaulttmpfs/agent.sock"
    broker_socket: str = "/run/vaulttmpfs/broker.sock"  # the agent's Vault broker for the driver's calls
    node_name: str = ""
    allow_insecure: bool = False  # VAULT_SKIP_VERIFY is refused unless this is set
    pods_dir: str = "/var/lib/kubelet/pods"  # the kubelet's (--root-dir)/pods: mount dirs must be below it
    policy_bindings: str | None = None  # which namespaces/service accounts may ask for which policies
    plugin_dir: str = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"  # the kubelet's --volume-plugin-dir
    log_level: str = "info"
    log_max_bytes: int = 10 * 1024 * 1024  # the log file is rotated to <file>.1 past this; 0: never
    # The agent's own login for the generator token (Vault's jwt or kubernetes auth); off unless a role is set.
    auth_role: str | None = None
    auth_mount: str = "jwt"
    auth_jwt_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Config":
        return cls.from_settings(settings(env))

    @classmethod
    def from_settings(cls, values: dict[str, str]) -> "Config":
        """From settings already merged (`settings()`); a DriverError names the first invalid one."""

        def get(name: str, default: str | None = None) -> str | None:
            return values.get(name) or default

        wrap_ttl = get("VAULT_WRAP_TTL", cls.wrap_ttl)
        if parse_duration(wrap_ttl, "VAULT_WRAP_TTL") <= 0:
            raise DriverError(f"VAULT_WRAP_TTL={wrap_ttl!r} must be positive")
        # VAULT_MAX_RETRIES is Vault's name; the original documented VAULT_MAX_RETRY.
        retries_text = get("VAULT_MAX_RETRIES", get("VAULT_MAX_RETRY", str(cls.max_retries)))
        try:
            max_retries = int(retries_text)
        except ValueError:
            raise DriverError(f"VAULT_MAX_RETRIES={retries_text!r} is not an integer") from None
        in_range(max_retries, "VAULT_MAX_RETRIES", retries_text, *MAX_RETRIES_RANGE)
        timeout_text = get("VAULT_CLIENT_TIMEOUT", "10s")
        timeout = in_range(parse_duration(timeout_text, "VAULT_CLIENT_TIMEOUT"), "VAULT_CLIENT_TIMEOUT",
                           timeout_text, *TIMEOUT_RANGE)
        budget_text = get("VAULTTMPFS_VAULT_WRITE_BUDGET", str(cls.vault_write_budget))
        if not budget_text.isdigit():
            raise DriverError(f"VAULTTMPFS_VAULT_WRITE_BUDGET={budget_text!r} is not an integer")
        in_range(int(budget_text), "VAULTTMPFS_VAULT_WRITE_BUDGET", budget_text, *WRITE_BUDGET_RANGE)
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
            timeout=timeout,
            vault_write_budget=int(budget_text),
            state_dir=get("VAULTTMPFS_STATE_DIR", cls.state_dir),
            log_file=get("VAULTTMPFS_LOG_FILE", cls.log_file),
            tmpfs_size=parse_size(get("VAULTTMPFS_TMPFS_SIZE", cls.tmpfs_size), "VAULTTMPFS_TMPFS_SIZE",
                                  *TMPFS_SIZE_RANGE),
            agent_socket=get("VAULTTMPFS_AGENT_SOCKET", cls.agent_socket),
            broker_socket=get("VAULTTMPFS_BROKER_SOCKET", cls.broker_socket),
            node_name=get("VAULTTMPFS_NODE_NAME", get("NODE_NAME", os.uname().nodename)),
            allow_insecure=parse_bool(get("VAULTTMPFS_ALLOW_INSECURE", ""), "VAULTTMPFS_ALLOW_INSECURE"),
            pods_dir=get("VAULTTMPFS_PODS_DIR", cls.pods_dir),
            policy_bindings=get("VAULTTMPFS_POLICY_BINDINGS"),
            plugin_dir=get("VAULTTMPFS_PLUGIN_DIR", cls.plugin_dir),
            log_level=log_level(get("VAULTTMPFS_LOG_LEVEL", cls.log_level)),
            log_max_bytes=byte_size(get("VAULTTMPFS_LOG_MAX_BYTES", str(cls.log_max_bytes)),
                                    "VAULTTMPFS_LOG_MAX_BYTES"),
            auth_role=get("VAULTTMPFS_AUTH_ROLE") and safe_name(get("VAULTTMPFS_AUTH_ROLE"), "VAULTTMPFS_AUTH_ROLE"),
            auth_mount=get("VAULTTMPFS_AUTH_MOUNT", cls.auth_mount).strip("/"),
            auth_jwt_path=get("VAULTTMPFS_AUTH_JWT_PATH", cls.auth_jwt_path),
        )

    @classmethod
    def fallback(cls, values: dict[str, str]) -> "Config":
        """What a call whose settings are invalid still needs to leave its log line and its metrics
        record: the log file, level and size bound, and the state dir; anything invalid is its default."""
        level = values.get("VAULTTMPFS_LOG_LEVEL") or cls.log_level
        max_bytes = values.get("VAULTTMPFS_LOG_MAX_BYTES") or str(cls.log_max_bytes)
        try:
            level = log_level(level)
        except DriverError:
            level = cls.log_level
        try:
            max_bytes = byte_size(max_bytes, "VAULTTMPFS_LOG_MAX_BYTES")
        except DriverError:
            max_bytes = cls.log_max_bytes
        return cls(log_file=values.get("VAULTTMPFS_LOG_FILE") or cls.log_file, log_level=level,
                   log_max_bytes=max_bytes, state_dir=values.get("VAULTTMPFS_STATE_DIR") or cls.state_dir)

    def public(self) -> dict:
        """Every setting by field name (no credential is a setting): for doctor and the agent's report."""
        return self.asdict()


LOG_LEVELS = ("debug", "info", "warning", "error")
_BYTE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def log_level(text: str) -> str:
    level = text.strip().lower()
    level = "warning" if level == "warn" else level
    if level not in LOG_LEVELS:
        raise DriverError(f"VAULTTMPFS_LOG_LEVEL={text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def byte_size(text: str, setting: str) -> int:
    """ "10485760", "10m", "10MiB" -> bytes: (\\d+)\\s*([kmg]i?b?)?, case-insensitive."""
    stripped = text.strip()
    end = _digits(stripped, 0)
    unit = stripped[end:].lstrip().lower()
    if not end or not (unit == "" or unit[0] in "kmg" and unit[1:] in ("", "i", "b", "ib")):
        raise DriverError(f"{setting}={text!r} is not a size (examples: 1048576, 512k, 10m)")
    return int(stripped[:end]) * _BYTE_UNITS[unit[:1]]
