"""The node's config file from the DaemonSet's ConfigMap: `vaulttmpfs install --config-from DIR`.

DIR is the ConfigMap mounted as a volume (one file per key). Its VAULT_*/VAULTTMPFS_* keys become
KEY=VALUE lines of the config file the driver reads on the host (VAULTTMPFS_CONFIG_FILE, default
/etc/vaulttmpfs/config/config.env), written root-owned 0644 in a root-owned 0755 dir, atomically: a
kubelet call reads the old file or the new one, never a mix. Unchanged content in a trusted file is
not rewritten.
"""

from __future__ import annotations

import os

from .. import trust
from ..config import Config, check_trusted, parse_config_text
from ..engine import files
from ..errors import DriverError

MAX_VALUE_BYTES = 4096


def render(source_dir: str) -> str:
    lines = ["# Written by `vaulttmpfs install --config-from` from the DaemonSet's ConfigMap; edit the ConfigMap."]
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if name.startswith(".") or not os.path.isfile(path):  # a ConfigMap volume's ..data links
            continue
        with open(path, "rb") as handle:
            value = handle.read(MAX_VALUE_BYTES + 1).decode("utf-8", errors="replace").strip()
        if len(value) > MAX_VALUE_BYTES or "\n" in value:
            raise DriverError(f"ConfigMap key {name} must be one line of at most {MAX_VALUE_BYTES} bytes")
        lines.append(f"{name}={value}")
    text = "\n".join(lines) + "\n"
    _refuse_what_the_driver_would_refuse(text, f"ConfigMap in {source_dir}")
    return text


def _refuse_what_the_driver_would_refuse(text: str, source: str) -> None:
    """The syntax and the values, read as the driver reads them: a value it refuses (VAULT_WRAP_TTL="5
    minutes") would fail every mount and unmount on the node, so it must not replace a good file."""
    values = parse_config_text(text, source)
    try:
        Config.from_settings(values)
    except DriverError as exc:
        raise DriverError(f"{source}: {exc}; the config file was not written") from None


def write(text: str, dest: str) -> str:
    """Put `text` (from render()) at `dest`: 'written' or 'unchanged'."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    trust.check_dirs(parent, f"config file {dest}")  # not even written where another user could swap it
    if _current_text(dest) == text and _trusted(dest):
        return "unchanged"
    # New content, or the same in a file someone loosened (chmod 0666, chowned to a user): taken back
    # by the same atomic replace, root's 0644, as install does with the bundle and the driver dir.
    files.replace(dest, text.encode(), 0o644, gid=0)
    check_trusted(dest)  # e.g. a dir above it others can write: say so at install, not at the first mount
    return "written"


def _current_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _trusted(path: str) -> bool:
    try:
        check_trusted(path)
    except DriverError:
        return False
    return True
