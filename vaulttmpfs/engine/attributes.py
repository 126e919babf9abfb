"""The volume attributes a pod sets (`vault/policies`, `vault/role`, `vault/unwrap`; any other `vault/` key is
refused), parsed the same way whatever front end carries them. Each error names the attribute (BadRequest);
`noun` is what the front end's users call it (CSI: attribute, FlexVolume: option)."""

from __future__ import annotations

from ..config import is_safe_name
from ..errors import BadRequest

POLICIES = "vault/policies"
ROLE = "vault/role"
UNWRAP = "vault/unwrap"
KNOWN = (POLICIES, ROLE, UNWRAP)
MAX_POLICIES = 32
MAX_GID = 2**31 - 1


def is_group_id(text: str) -> bool:
    """A gid as the kubelet passes one (FlexVolume's mounterArgs.FsGroup, CSI's volume_mount_group). ASCII
    digits only: str.isdigit() also takes "²" (which int() refuses) and "١٠٠٠" (which it reads as 1000); and
    at most 10 of them before int() (past 4300 digits it raises ValueError)."""
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_GID


def require_known(attributes: dict[str, str], noun: str = "attribute") -> None:
    """Every `vault/` key is one vaulttmpfs reads: a typo (`vault/unwarp`, `vault/rol`) must not be ignored,
    leaving the volume wrapped or on the default role without a word. Other keys are the kubelet's or
    another tool's."""
    unknown = sorted(k for k in attributes if k.startswith("vault/") and k not in KNOWN)
    if unknown:
        raise BadRequest(f"unknown {noun} {unknown[0]!r}; vaulttmpfs reads {', '.join(KNOWN)}")


def policies(text: str | None, noun: str = "attribute") -> list[str]:
    if text is None:
        raise BadRequest(f"{noun} {POLICIES!r} is required (comma-separated Vault policy names)")
    names = [p.strip() for p in text.split(",")]
    if not any(names):
        raise BadRequest(f"{noun} {POLICIES!r} is empty")
    for name in names:
        if not name or not is_safe_name(name):
            raise BadRequest(f"{noun} {POLICIES!r} has an invalid policy name {name!r}")
    if len(names) > MAX_POLICIES:
        raise BadRequest(f"{noun} {POLICIES!r} names more than {MAX_POLICIES} policies")
    return list(dict.fromkeys(names))


def role(text: str | None, default: str, noun: str = "attribute") -> str:
    name = text or default
    if not is_safe_name(name):
        raise BadRequest(f"{noun} {ROLE!r} has an invalid role name {name!r}")
    return name


def flag(attributes: dict[str, str], key: str, noun: str = "attribute") -> bool:
    value = attributes.get(key, "").strip().lower()
    if value in ("", "false", "no", "0"):
        return False
    if value in ("true", "yes", "1"):
        return True
    raise BadRequest(f"{noun} {key!r} must be \"true\" or \"false\", got {attributes[key]!r}")
