"""The typed values the engine passes around: a volume's record, a minted token, a revocation's outcome.

A record's JSON is the one every version wrote (csi-lib's metadata.Metadata, here with the fields
unmount needs to revoke): from_json reads each older shape, to_json writes today's keys only.
"""

from __future__ import annotations

from ..value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the exec path
if TYPE_CHECKING:
    from typing import Any

FROM_METADATA = "volume metadata"  # a record rebuilt from the volume's own metadata file
REVOKED, GONE, QUEUED, NOTHING = "revoked", "already gone", "queued", "nothing"  # Revocation.outcome


class MadeWith(Value):  # Value, not typing.NamedTuple: see value.py
    """How the volume was mounted, to refuse a republish that asks otherwise."""

    read_only: bool
    fs_group: int | None
    unwrapped: bool | None = None  # vault/unwrap; None: written before it was kept (not compared)


class VolumeRecord(Value):
    accessor: str | None  # the pod token's: what unmount revokes
    wrapping_accessor: str | None = None  # the wrapping token's (alive until unwrapped or its TTL ends)
    mount_dir: str = ""
    role: str = ""
    policies: tuple[str, ...] = ()
    pod_uid: str = ""
    namespace: str = ""
    pod: str = ""
    service_account: str = ""  # "": not known (a record written before it was kept)
    volume_name: str = ""  # the pod's name for the volume; "": not known (written before it was kept)
    made_with: MadeWith | None = None  # None: written before read_only/fs_group were kept
    source: str = ""  # FROM_METADATA when rebuilt from the volume, not read from the state dir
    since: float | None = None  # when the record was written (list_volumes: the file's mtime)

    def accessors(self) -> list[str]:
        """The pod token, then its wrapping token."""
        return [a for a in (self.accessor, self.wrapping_accessor) if a]

    def token_identity(self, node: str, **more: str) -> tuple[dict[str, str], str]:
        """The metadata and display name of a token minted for this volume (a rotation's)."""
        return token_identity(node, self.namespace, self.pod, self.pod_uid, self.service_account,
                              self.volume_name, **more)

    def to_json(self) -> dict[str, Any]:
        value = {"mount_dir": self.mount_dir, "accessor": self.accessor, "wrapping_accessor": self.wrapping_accessor,
                 "role": self.role, "policies": list(self.policies), "pod_uid": self.pod_uid,
                 "namespace": self.namespace, "pod": self.pod}
        if self.made_with:
            value.update(read_only=self.made_with.read_only, fs_group=self.made_with.fs_group)
            if self.made_with.unwrapped is not None:
                value["unwrapped"] = self.made_with.unwrapped
        # Kept from this version on (a rotation's bindings check and token metadata); absent when not known.
        if self.service_account:
            value["service_account"] = self.service_account
        if self.volume_name:
            value["volume_name"] = self.volume_name
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any], since: float | None = None) -> VolumeRecord:
        """Any record a version of vaulttmpfs wrote; a field of the wrong type reads as absent."""
        made_with = None
        if "read_only" in value or "fs_group" in value:  # without them the record predates made_with: unknown
            group, unwrapped = value.get("fs_group"), value.get("unwrapped")
            made_with = MadeWith(value.get("read_only") is True,
                                 group if isinstance(group, int) and not isinstance(group, bool) else None,
                                 unwrapped if isinstance(unwrapped, bool) else None)
        policies = value.get("policies")
        return cls(
            accessor=_text(value, "accessor") or None,
            wrapping_accessor=_text(value, "wrapping_accessor") or None,
            mount_dir=_text(value, "mount_dir"),
            role=_text(value, "role"),
            policies=tuple(p for p in policies if isinstance(p, str)) if isinstance(policies, list) else (),
            pod_uid=_text(value, "pod_uid"),
            namespace=_text(value, "namespace"),
            pod=_text(value, "pod"),
            service_account=_text(value, "service_account"),
            volume_name=_text(value, "volume_name"),
            made_with=made_with,
            source=_text(value, "source"),
            since=since,
        )


def token_identity(node: str, namespace: str, pod: str, pod_uid: str, service_account: str, volume: str,
                   **more: str) -> tuple[dict[str, str], str]:
    """A pod token's metadata and display name, from its volume's identity: the one place a mount and a
    rotation (which adds `rotated_from`) build them. Metadata keys without a value are left out.

    Display name `vaulttmpfs-<namespace>-POD-<pod>`. Vault keeps only [A-Za-z0-9-] of a display name
    (each other character becomes `-`, then it prefixes `token-`), and Kubernetes names are lower case
    ([a-z0-9-] for a namespace, plus `.` for a pod): an upper-case separator both survives Vault and
    can occur in neither name, so `team-a`/`web` and `team`/`a-web` stay apart
    (`vaulttmpfs-team-a.web` would not: Vault keeps it as `token-vaulttmpfs-team-a-web`). A pod name's `.`
    still becomes `-` in Vault (`web.v2` and `web-v2` look alike there): the metadata's `pod` is exact.
    Cut to 100 characters: a namespace is at most 63, so only the pod name's end is ever cut."""
    meta = {"created_by": "vaulttmpfs", "namespace": namespace, "pod": pod, "pod_uid": pod_uid,
            "service_account": service_account, "volume": volume, "node": node, **more}
    shown = f"vaulttmpfs-{namespace}-POD-{pod}" if namespace or pod else "vaulttmpfs-pod"
    return {k: v for k, v in meta.items() if v}, shown[:100]


def _text(value: dict[str, Any], key: str) -> str:
    found = value.get(key)
    return found if isinstance(found, str) else ""


class Minted(Value):
    """A new token for a volume, as Vault answered."""

    _hidden = ("secret", "info")  # never in a repr
    secret: str  # the token file's content: the wrapping token (the plain one with vault/unwrap)
    info: dict[str, Any]  # the metadata file's content; never the plain token
    accessor: str  # the pod token's
    wrapping_accessor: str | None  # None when unwrapped


class Revocation(Value):
    """What became of a volume's tokens: revoked, already gone, queued for the agent, or nothing to do."""

    outcome: str  # REVOKED, GONE, QUEUED or NOTHING
    accessor: str | None = None  # the pod token's
    error: str = ""  # why it was queued

    @property
    def queued(self) -> bool:
        return self.outcome == QUEUED

    def __str__(self) -> str:
        if self.outcome == NOTHING:
            return "nothing to revoke"
        if self.queued:
            return f"could not revoke the pod token (accessor {self.accessor}) now, queued for retry: {self.error}"
        return f"token {self.outcome} (accessor {self.accessor})"
