"""`vaulttmpfs bootstrap` and `vaulttmpfs renew-generator`: the node's generator token, from login to file.

bootstrap: log in (VAULT_TOKEN, else LDAP), refuse root, optionally set Vault up from policies/,
mint an orphan periodic token through the generator role, write it 0600. No click here: the CLI
passes in how to ask for LDAP credentials, and prints the summary.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import log, trust
from ..config import Config, parse_duration, safe_name
from ..engine import generator
from ..errors import DriverError, VaultDenied
from ..vault.client import Vault

# Generator tokens are minted through this role, not auth/token/create-orphan: a non-root caller
# needs sudo there to grant a policy it lacks or to make a token periodic (sudo would let it mint
# nearly anything), while the role fixes policy, orphan and period and needs only `update` on it.
GENERATOR_ROLE = "vaulttmpfs-generator"
DEFAULT_POLICY = "token_generator"
ADMIN_POLICY = "vaulttmpfs-admin"
POLICY_FILE = "token_generator_policy.hcl"
APPLICATIONS_ROLE_FILE = "applications_role.json"
GENERATOR_ROLE_FILE = "generator_role.json"
ADMIN_POLICY_FILE = "vaulttmpfs_admin_policy.hcl"
# `--setup-vault` writes the generator policy and both roles: whoever may do that may grant generator
# tokens anything, so it is a separate policy for the cluster's Vault operators, not the admin group.
SETUP_POLICY = "vaulttmpfs-setup"
SETUP_POLICY_FILE = "vaulttmpfs_setup_policy.hcl"
# The shipped policy names the default pod-token role; another VAULTTMPFS_ROLE_NAME is put in its place.
SHIPPED_CREATE_PATH = '"auth/token/create/applications"'
SHIPPED_ROLE_PATH = '"auth/token/roles/applications"'  # read, for `vaulttmpfs doctor`
_MOUNT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_DURATION_FIELDS = {"token_period", "token_explicit_max_ttl", "token_ttl", "token_max_ttl"}

Credentials = Callable[[], "tuple[str, str]"]


@dataclass(frozen=True)
class Options:
    token_path: str
    policy: str = DEFAULT_POLICY
    period: str | None = None  # None: the generator role's own period (24h as shipped)
    force: bool = False
    setup_vault: bool = False
    policies_dir: str | None = None
    ldap_mount: str = "ldap"


@dataclass(frozen=True)
class Login:
    vault: Any  # a vault.Vault carrying the login token
    method: str  # "ldap" or "token"
    who: str
    policies: list[str]


def root_refusal(what: str) -> str:
    return (
        f"{what} carries the root policy. vaulttmpfs bootstrap does not work with root tokens, so that a root "
        "token is never typed on, or handed to, a node. Use a token or an LDAP group with the "
        f"{ADMIN_POLICY} policy instead; as root, once: `bao policy write {ADMIN_POLICY} "
        f"policies/{ADMIN_POLICY_FILE}`, then `bao write auth/ldap/groups/<group> policies={ADMIN_POLICY}` "
        f"or `VAULT_TOKEN=$(bao token create -policy={ADMIN_POLICY} -ttl=1h -field=token) vaulttmpfs bootstrap`"
    )


def bootstrap(config: Config, options: Options, vault_token: str | None, credentials: Credentials) -> dict[str, Any]:
    """Provision the node's generator token; returns what was done (never the token)."""
    logger = log.get(command="bootstrap", node=config.node_name, path=options.token_path)
    try:
        _check(options)
        files = PolicyFiles.find(options.policies_dir) if options.setup_vault else None
        old = _live_token(config, options)
        login = _login(config, options, vault_token, credentials)
        logger.info("logged in", method=login.method, who=login.who, policies=login.policies)
        try:
            result = _provision(config, options, login, files, old)
        finally:
            if login.method == "ldap":
                _drop_login(login, logger)
    except DriverError as exc:
        logger.error("bootstrap failed", error=str(exc))
        raise
    logger.info("generator token written", **{k: v for k, v in result.items() if k != "setup"}, setup=result["setup"])
    return result


def _provision(config: Config, options: Options, login: Login, files, old: dict | None) -> dict[str, Any]:
    if "root" in login.policies:
        raise DriverError(root_refusal("VAULT_TOKEN" if login.method == "token" else "The LDAP login token"))
    setup = _setup_or_explain(login, config, options, files) if files else []
    auth = _mint(config, options, login)
    try:
        _make_token_dir(options.token_path)
        generator.write_token(options.token_path, auth["client_token"])
    except (OSError, DriverError) as exc:
        _discard(config, auth)
        why = getattr(exc, "strerror", None) or exc
        raise DriverError(f"cannot write the generator token to {options.token_path}: {why}") from None
    replaced = None
    if old:
        replaced = {"accessor": log.accessor_hint(old["accessor"]), "revoked": _discard(config, old)}
    return {
        "path": options.token_path,
        # A generator token's accessor lets any other generator token revoke it: only its first
        # characters are shown or logged (enough to find it in `bao list auth/token/accessors`).
        "accessor": log.accessor_hint(auth["accessor"]),
        "policies": auth.get("policies") or [],
        "ttl": auth.get("lease_duration"),
        "orphan": auth.get("orphan"),
        "method": login.method,
        "who": login.who,
        "replaced": replaced,
        "setup": setup,
    }


def _setup_or_explain(login: Login, config: Config, options: Options, files) -> list[str]:
    try:
        return setup_vault(login.vault, config, options, files)
    except VaultDenied as exc:
        if "permission denied" not in str(exc).lower():
            raise
        who = f"LDAP user {login.who}" if login.method == "ldap" else "VAULT_TOKEN"
        raise VaultDenied(
            f"{exc} -- {who} may not set Vault up: --setup-vault is a one-time step for a Vault operator, with a "
            f"token holding the {SETUP_POLICY} policy (policies/{SETUP_POLICY_FILE}) and {ADMIN_POLICY}; the "
            f"{ADMIN_POLICY} group only mints generator tokens. Nothing was minted"
        ) from None


def _make_token_dir(token_path: str) -> None:
    # Checked, created 0700 if missing, then checked again: in a sticky dir another user could have made it first.
    trust.check_parent(token_path, "generator token path")
    os.makedirs(os.path.dirname(os.path.abspath(token_path)), mode=0o700, exist_ok=True)
    trust.check_parent(token_path, "generator token path")


def _check(options: Options) -> None:
    safe_name(options.policy, "--policy")
    if options.policy == "root":
        raise DriverError(root_refusal("--policy root"))
    if options.period is not None and parse_duration(options.period, "--period") <= 0:
        raise DriverError(f"--period={options.period!r} must be positive")
    if not _MOUNT.fullmatch(options.ldap_mount) or ".." in options.ldap_mount.split("/"):
        raise DriverError(f"--ldap-mount={options.ldap_mount!r} is not a Vault mount path (example: ldap)")
    # Root writes (and may revoke) what is there: no one else may be able to swap the dir or the file.
    trust.check_parent(options.token_path, "generator token path")


def _live_token(config: Config, options: Options) -> dict[str, str] | None:
    """The token already in the file, if Vault still honours it; refuse to replace it without --force,
    and refuse to revoke anything but a vaulttmpfs generator token even with it."""
    token = generator.existing_token(options.token_path)
    if not token:
        return None
    try:
        token = clean_token(token, f"the token already in {options.token_path}")
    except DriverError:
        return None  # not a token at all: nothing Vault honours
    try:
        info = Vault(config, token).lookup_self(f"the token already in {options.token_path}")
    except VaultDenied:
        return None  # expired or revoked (or not a token at all): nothing to protect
    found = _not_a_generator(info, options.policy)
    if found:
        raise DriverError(
            f"{options.token_path} holds a live token that is not a vaulttmpfs generator token ({found}); "
            "bootstrap neither replaces nor revokes it, even with --force. If that token is yours, move the file "
            f"away (`mv {options.token_path} <elsewhere>`) and bootstrap again; nothing was revoked"
        )
    if not options.force:
        raise DriverError(
            f"{options.token_path} already holds a live generator token (accessor "
            f"{log.accessor_hint(info.get('accessor'))}, valid for {human_duration(info.get('ttl'))}); "
            "pass --force to replace it (the old token is revoked)"
        )
    return {"token": token, "accessor": info.get("accessor", "")}


def _not_a_generator(info: dict[str, Any], policy: str) -> str | None:
    """What makes a token other than a generator token, said without its accessor; None if it is one.

    A generator token has exactly the generator policy (the role gives no default policy) and is an
    orphan: revoking it takes no one else's token with it. Tokens made by hand for the original
    driver (`-policy=token_generator -orphan`) count too."""
    policies = sorted(info.get("policies") or [])
    if policies == [policy] and info.get("orphan", True):
        return None
    path = info.get("path") or "an unknown path"
    return (f"policies {','.join(policies) or 'none'}, display name {info.get('display_name') or '?'}, "
            f"created through {path}{'' if info.get('orphan', True) else ', not an orphan'}")


def clean_token(value: str, what: str) -> str:
    """A token from the environment or a file: surrounding whitespace dropped (a trailing newline is
    common from `kubectl create secret --from-file`), then it must look like a token. It goes into
    an HTTP header, so anything else would end up in an error message; it is never shown."""
    log.secret(value)
    token = value.strip()
    log.secret(token)
    if not token or len(token) > 4096 or not (token.isascii() and token.isprintable()) or " " in token:
        raise DriverError(f"{what} is not a Vault token (one line of printable ASCII expected); "
                          "check how it was set (its value is not shown)")
    return token


def _login(config: Config, options: Options, vault_token: str | None, credentials: Credentials) -> Login:
    if vault_token:
        vault = Vault(config, clean_token(vault_token, "VAULT_TOKEN"))
        try:
            info = vault.lookup_self("VAULT_TOKEN")
        except VaultDenied as exc:
            raise VaultDenied(f"{exc} -- VAULT_TOKEN is expired, revoked or not from this Vault; "
                              "unset it to log in with LDAP instead") from None
        return Login(vault, "token", info.get("display_name") or "token", info.get("policies") or [])
    username, password = credentials()
    if not username or "/" in username or username in {".", ".."} or not username.isprintable():
        raise DriverError(f"{username!r} is not an LDAP username")
    if not password:
        raise DriverError("the LDAP password is empty")
    log.secret(password)
    vault = Vault(config, None)
    auth = vault.ldap_login(username, password, options.ldap_mount)
    log.secret(auth.get("client_token"))
    return Login(vault, "ldap", username, auth.get("policies") or [])


def _mint(config: Config, options: Options, login: Login) -> dict[str, Any]:
    metadata = {"node": config.node_name, "bootstrap": login.method, "bootstrapped_by": login.who}
    try:
        auth = login.vault.create_token(GENERATOR_ROLE, [options.policy], metadata,
                                        f"vaulttmpfs-{config.node_name}"[:100])
    except VaultDenied as exc:
        raise VaultDenied(f"{exc} -- {_mint_hint(str(exc), login)}") from None
    log.secret(auth.get("client_token"))
    if "root" in (auth.get("policies") or []):
        _discard(config, auth)
        raise DriverError(root_refusal("The token Vault minted"))
    if options.period is not None:
        wanted = parse_duration(options.period, "--period")
        if abs((auth.get("lease_duration") or 0) - wanted) > 1:
            _discard(config, auth)
            raise DriverError(
                f"the token role {GENERATOR_ROLE} gives generator tokens a period of "
                f"{human_duration(auth.get('lease_duration'))}, not {options.period}; change the role with "
                f"`vaulttmpfs bootstrap --setup-vault --period {options.period}` (a Vault operator's token with the "
                f"{SETUP_POLICY} policy)"
            )
    return auth


def _mint_hint(error: str, login: Login) -> str:
    who = f"LDAP user {login.who}" if login.method == "ldap" else "VAULT_TOKEN"
    if "permission denied" in error.lower():
        return (f"{who} may not mint generator tokens: it needs the {ADMIN_POLICY} policy "
                f"(policies/{ADMIN_POLICY_FILE})")
    if "role" in error.lower():
        return (f"is Vault set up for vaulttmpfs? a Vault operator runs `vaulttmpfs bootstrap --setup-vault` once, "
                f"with a token holding the {SETUP_POLICY} policy (policies/{SETUP_POLICY_FILE})")
    return "see Vault's answer above"


def _discard(config: Config, auth: dict) -> bool:
    """Revoke a token with itself (generator tokens may revoke by accessor); best effort."""
    token = auth.get("client_token") or auth.get("token")
    try:
        return Vault(config, token).revoke_accessor(auth["accessor"])
    except (DriverError, KeyError):
        return False


def _drop_login(login: Login, logger) -> None:
    # The LDAP login token carries the admin's rights and is of no more use; the generator token
    # is an orphan, so revoking its creator leaves it alive.
    try:
        login.vault.revoke_self()
    except DriverError as exc:
        logger.warning("could not revoke the LDAP login token", error=str(exc))


# --- `--setup-vault` ---
@dataclass(frozen=True)
class PolicyFiles:
    """policies/: the one copy of what vaulttmpfs writes into Vault."""

    root: Path

    @classmethod
    def find(cls, explicit: str | None) -> "PolicyFiles":
        root = Path(explicit) if explicit else default_policies_dir()
        missing = [name for name in (POLICY_FILE, APPLICATIONS_ROLE_FILE, GENERATOR_ROLE_FILE)
                   if not (root / name).is_file()]
        if missing:
            raise DriverError(f"no {', '.join(missing)} in {root}; point --policies-dir at vaulttmpfs' policies/ dir")
        return cls(root)

    def text(self, name: str) -> str:
        return (self.root / name).read_text(encoding="utf-8")

    def json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self.text(name))
        except ValueError as exc:
            raise DriverError(f"{self.root / name} is not valid JSON: {exc}") from None

    def generator_policy(self, role: str) -> str:
        text = self.text(POLICY_FILE)
        if role == "applications":
            return text
        if SHIPPED_CREATE_PATH not in text:
            raise DriverError(f"{self.root / POLICY_FILE} has no {SHIPPED_CREATE_PATH} to point at role {role!r}")
        return text.replace(SHIPPED_CREATE_PATH, f'"auth/token/create/{role}"').replace(
            SHIPPED_ROLE_PATH, f'"auth/token/roles/{role}"')


def default_policies_dir() -> Path:
    if getattr(sys, "frozen", False):
        # The PyInstaller build carries policies/ in its bundle dir (build.spec `datas`).
        return Path(sys._MEIPASS) / "policies"
    return Path(__file__).resolve().parents[2] / "policies"


def setup_vault(vault, config: Config, options: Options, files: PolicyFiles) -> list[str]:
    """Write what a new cluster lacks; what an operator has already tuned is reported, not overwritten."""
    return [
        _ensure_policy(vault, options.policy, files.generator_policy(config.role_name), files.root / POLICY_FILE),
        _ensure_role(vault, config.role_name, files.json(APPLICATIONS_ROLE_FILE)),
        _converge_generator_role(vault, options, files.json(GENERATOR_ROLE_FILE)),
    ]


def _ensure_policy(vault, name: str, text: str, source: Path) -> str:
    current = vault.read_policy(name)
    if current is None:
        vault.write_policy(name, text)
        return f"policy {name}: created from {source}"
    if current.strip() == text.strip():
        return f"policy {name}: unchanged"
    return f"policy {name}: exists and differs from {source}; left as it is"


def _ensure_role(vault, name: str, params: dict[str, Any]) -> str:
    # Its allowed_policies are the operator's list of what pods may get: never reset them.
    if vault.read_token_role(name) is not None:
        return f"token role {name}: exists; left as it is"
    vault.write_token_role(name, params)
    return f"token role {name}: created"


def _converge_generator_role(vault, options: Options, params: dict[str, Any]) -> str:
    # vaulttmpfs owns this role: it is made to match the file, --policy and --period.
    existing = vault.read_token_role(GENERATOR_ROLE)
    params = {**params, "allowed_policies": [options.policy]}
    if options.period is not None:
        params["token_period"] = options.period
    elif existing and existing.get("token_period"):
        params["token_period"] = f"{existing['token_period']}s"  # keep a period chosen earlier
    if existing is not None and _same_role(existing, params):
        return f"token role {GENERATOR_ROLE}: unchanged"
    vault.write_token_role(GENERATOR_ROLE, params)
    return f"token role {GENERATOR_ROLE}: {'updated' if existing else 'created'} (period {params['token_period']})"


def _same_role(existing: dict[str, Any], params: dict[str, Any]) -> bool:
    for key, want in params.items():
        have = existing.get(key)
        if key in _DURATION_FIELDS:
            if parse_duration(str(want), key) != float(have or 0):
                return False
        elif isinstance(want, list):
            if sorted(want) != sorted(have or []):
                return False
        elif want != have:
            return False
    return True


# --- `renew-generator` ---
def renew_generator(config: Config) -> dict[str, Any]:
    path = config.generator_token_path
    logger = log.get(command="renew-generator", path=path)
    try:
        auth = generator.renew(config)
    except VaultDenied as exc:
        logger.error("renewal failed", error=str(exc))
        if "permission denied" in str(exc).lower() or "invalid token" in str(exc).lower():
            raise DriverError(
                f"the generator token in {path} is expired or revoked ({exc}); "
                "get a new one with `vaulttmpfs bootstrap` on this node"
            ) from None
        raise
    except DriverError as exc:
        logger.error("renewal failed", error=str(exc))
        raise
    result = {"path": path, "accessor": log.accessor_hint(auth.get("accessor")), "ttl": auth.get("lease_duration"),
              "policies": auth.get("policies") or [], "renewable": auth.get("renewable")}
    logger.info("generator token renewed", **result)
    return result


# --- what the CLI prints ---
def human_duration(seconds: Any) -> str:
    try:
        total = int(seconds)
    except (TypeError, ValueError):
        return "an unknown time"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"


def summary(result: dict[str, Any]) -> list[str]:
    lines = list(result["setup"])
    who = f"LDAP user {result['who']}" if result["method"] == "ldap" else f"VAULT_TOKEN ({result['who']})"
    lines.append(
        f"generator token written to {result['path']} (mode 0600): accessor {result['accessor']}, "
        f"policies {','.join(result['policies'])}, valid for {human_duration(result['ttl'])} unless renewed, "
        f"created by {who}"
    )
    if result["replaced"]:
        state = "revoked" if result["replaced"]["revoked"] else "could not be revoked: revoke it yourself"
        lines.append(f"the token it replaced (accessor {result['replaced']['accessor']}) {state}")
    lines.append("keep it alive with `vaulttmpfs renew-generator` (cron) or `vaulttmpfs agent`")
    return lines


def renew_summary(result: dict[str, Any]) -> str:
    return (f"generator token in {result['path']} renewed (accessor {result['accessor']}): "
            f"valid for {human_duration(result['ttl'])}, policies {','.join(result['policies'])}")
