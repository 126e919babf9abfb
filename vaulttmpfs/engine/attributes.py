"""The volume attributes a pod sets (`vault/policies`, `vault/role`), parsed the same way whatever
front end carries them. Each error names the attribute (BadRequest)."""

from __future__ import annotations

from ..config import SAFE_NAME
from ..errors import BadRequest

POLICIES = "vault/policies"
ROLE = "vault/role"
KNOWN = (POLICIES, ROLE)
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
