"""Are the user and group ids the demo and the tests use mapped here? All are for real root; in a
user namespace only those in /proc/self/{uid,gid}_map exist, and a `mount -o gid=N`, chown or
setuid to any other fails (EINVAL/EPERM). tests/userns.sh maps 0..65535 (the user's subordinate ids).
Stdlib only, like vaultserver.py.
"""

from __future__ import annotations

import os

# fsGroup gids (1000, 2000, the manifests' own), nobody (65534) for the relay's peer-uid checks.
NEEDED = range(0, 65535)


def first_unmapped(kind: str, ids: range = NEEDED) -> int | None:
    """The lowest id of `ids` that /proc/self/<kind>_map (kind: uid or gid) does not map, else None."""
    with open(f"/proc/self/{kind}_map") as maps:
        ranges = sorted((int(inner), int(inner) + int(count))
                        for inner, _outer, count in (line.split() for line in maps if line.strip()))
    wanted = ids.start
    for start, end in ranges:
        if start > wanted:
            break
        wanted = max(wanted, end)
    return wanted if wanted < ids.stop else None


def problem() -> str | None:
    """Why the demo or the suite cannot run here, in one line, or None."""
    if os.geteuid() != 0:
        return "it mounts real tmpfs: run it as root, or through make (tests/userns.sh, a user namespace)"
    missing = {kind: first_unmapped(kind) for kind in ("uid", "gid")}
    if any(value is not None for value in missing.values()):
        shown = ", ".join(f"{kind} {value}" for kind, value in missing.items() if value is not None)
        return (f"this user namespace does not map the ids {NEEDED.start}..{NEEDED.stop - 1} "
                f"(first missing: {shown}): run it through make, whose tests/userns.sh maps them")
    return None
