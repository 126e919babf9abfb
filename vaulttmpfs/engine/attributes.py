"""The volume attributes a pod sets (`vault/policies`, `vault/role`), parsed the same way whatever
front end carries them. Each error names the attribute (BadRequest)."""

from __future__ import annotations

from ..config import SAFE_NAME
from ..errors import BadRequest

POLICIES = "vault/policies"
ROLE = "vault/role"
UNWRAP = "vault/unwrap"
KNOWN = (POLICIES, ROLE, UNWRAP)
MAX_POLICIES = 32


def policies(text: str | None) -> list[str]:
    if text is None:
        raise BadRequest(f"attribute {POLICIES!r} is required (comma-separated Vault policy names)")
    names = [p.strip() for p in text.split(",")]
    if not any(names):
        raise BadRequest(f"attribute {POLICIES!r} is empty")
    for name in names:
        if not name or not SAFE_NAME.fullmatch(name):
            raise BadRequest(f"attribute {POLICIES!r} has an invalid policy name {name!r}")
    if len(names) > MAX_POLICIES:
        raise BadRequest(f"attribute {POLICIES!r} names more than {MAX_POLICIES} policies")
    return list(dict.fromkeys(names))


def role(text: str | None, default: str) -> str:
    name = text or default
    if not SAFE_NAME.fullmatch(name):
        raise BadRequest(f"attribute {ROLE!r} has an invalid role name {name!r}")
    return name


def flag(attributes: dict[str, str], key: str) -> bool:
    value = attributes.get(key, "").strip().lower()
    if value in ("", "false", "no", "0"):
        return False
    if value in ("true", "yes", "1"):
        return True
    raise BadRequest(f"attribute {key!r} must be \"true\" or \"false\", got {attributes[key]!r}")
