"""The pod's view of its vaulttmpfs volume: the token file, its JSON metadata and Vault's CA. Files only."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime

from ..errors import DriverError

MAX_TOKEN_BYTES = 4096
CA_FILE = "ca.crt"
# A rotation's two renames (token, then metadata) are milliseconds apart: ~1 s of looks covers them.
SETTLE_TRIES, SETTLE_STEP = 10, 0.1


class MidRotation(DriverError):
    """The token file and the metadata name different wrapping tokens: a rotation between its two renames
    (or a tampered volume). Such a pair is never unwrapped: the token would not be the one the metadata
    names, and the check after the unwrap would revoke it."""


@dataclass(frozen=True)
class VolumeToken:
    directory: str
    token: str  # the wrapping token; on an unwrapped volume, the pod's token itself
    accessor: str  # the pod token's accessor: what the output records, to recognise it after a restart
    wrapped: bool
    expires_at: float | None = None  # when the wrapping token's TTL ends (epoch seconds)
    ca_path: str | None = None
    created_at: float | None = None  # when the node minted it (Vault's creation_time): the pod token's lease starts


def read(directory: str, token_filename: str, tries: int = SETTLE_TRIES) -> VolumeToken:
    """The volume's token; a token file and metadata caught mid-rotation are looked at again, `tries`
    times in all, then MidRotation."""
    for _ in range(tries - 1):
        try:
            return _read_pair(directory, token_filename)
        except MidRotation:
            time.sleep(SETTLE_STEP)
    return _read_pair(directory, token_filename)


def _read_pair(directory: str, token_filename: str) -> VolumeToken:
    token_path, meta_path = os.path.join(directory, token_filename), os.path.join(directory, f"{token_filename}.json")
    token = _read_token(token_path)
    meta = _read_metadata(meta_path)
    if meta.get("token") and meta["token"] != token:  # the wrap_info names its wrapping token
        raise MidRotation(f"{token_path} and {meta_path} name different wrapping tokens: a rotation (`vaulttmpfs "
                          "rotate`) between its two writes, or a tampered volume; nothing was unwrapped (the "
                          "next run looks again)")
    ca_path = os.path.join(directory, CA_FILE)
    ca_path = ca_path if os.path.isfile(ca_path) else None
    if meta.get("wrapped_accessor"):
        created = _created(meta)
        return VolumeToken(directory, token, str(meta["wrapped_accessor"]), True, _expiry(meta, created), ca_path,
                           created)
    if meta.get("accessor") and meta.get("unwrapped"):
        return VolumeToken(directory, token, str(meta["accessor"]), False, None, ca_path)
    raise DriverError(f"{directory}/{token_filename}.json names no token accessor: is {directory} a vaulttmpfs "
                      "volume (check the pod's volumeMounts)?")


def _read_token(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        raise DriverError(f"{path} does not exist: mount the vaulttmpfs volume there, or name its mount "
                          "path with --volume") from None
    except OSError as exc:
        raise DriverError(f"cannot read {path}: {exc.strerror} (the pod's user needs the volume's group: set "
                          "the pod's securityContext.fsGroup)") from None
    token = raw.decode("ascii", errors="replace").strip()
    if not token or len(raw) > MAX_TOKEN_BYTES or not token.isprintable() or any(c.isspace() for c in token):
        raise DriverError(f"{path} does not hold a Vault token")
    return token


def _read_metadata(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        raise DriverError(f"{path} does not exist: is this a vaulttmpfs volume?") from None
    except (OSError, ValueError) as exc:
        raise DriverError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(meta, dict):
        raise DriverError(f"{path} is not a JSON object")
    return meta


def _expiry(meta: dict, created: float | None) -> float | None:
    """When the wrapping token's TTL ends; None when the metadata does not say."""
    ttl = meta.get("ttl")
    return created + ttl if created is not None and isinstance(ttl, (int, float)) else None


def _created(meta: dict) -> float | None:
    """creation_time (RFC 3339, nanoseconds) in epoch seconds; None when the metadata does not say."""
    created = meta.get("creation_time")
    if not isinstance(created, str):
        return None
    # Go writes up to 9 fractional digits; datetime takes 6.
    text = re.sub(r"(\.\d{6})\d+", r"\1", created).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
