"""`vaulttmpfs uninstall`: take the driver off this node, leaving no token and no file behind.

Refused while any volume is mounted (the kubelet could no longer unmount it, and its pod token
would outlive the pod) or any revocation is still owed. Then the node's generator token is
revoked and its file removed, and the driver dir leaves the kubelet's plugin dir in one rename
(to a dot name the kubelet's watcher ignores) before it is deleted. When this runs from the
installed bundle itself, the removal is the last thing it does: nothing is imported after it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .. import log
from ..config import Config
from ..engine import generator, operation, reconcile, volume
from ..engine.layout import CSI
from ..engine.record import VolumeRecord
from ..engine.state import StateStore
from ..errors import DriverError, VaultDenied
from ..vault.client import Vault
from . import install

TRASH = ".vaulttmpfs-uninstall.tmp"


def held_volumes(config: Config) -> list[VolumeRecord]:
    """Volumes still mounted: the state records, and our tmpfs mounts this mount namespace shows."""
    held = {r.mount_dir: r for r in StateStore(config.state_dir).list_volumes()}
    prefix = os.path.realpath(config.pods_dir) + "/"
    for entry in volume.mounts():
        target = entry["target"]
        if entry["fstype"] == "tmpfs" and entry["source"] == volume.MOUNT_SOURCE and target.startswith(prefix):
            held.setdefault(target, VolumeRecord(None, mount_dir=target, pod_uid=target[len(prefix):].split("/")[0]))
    return list(held.values())


def _who(record: VolumeRecord) -> str:
    name = "/".join(p for p in (record.namespace, record.pod) if p)
    return f"{name or 'pod'} (uid {record.pod_uid or '?'})"


def uninstall(config: Config, plugin_dir: str, revoke: bool = True, serving_csi: bool = False) -> dict[str, Any]:
    """serving_csi: this process serves the CSI teardown meanwhile (`uninstall --wait --csi-endpoint`)."""
    logger = log.get(command="uninstall", plugin_dir=plugin_dir)
    # Volumes whose dir the kubelet already removed (e.g. a tmpfs lost with a reboot) hold no pod:
    # their tokens go now, by the agent's own rule (nothing where the pods dir is not visible).
    reconciled = reconcile.reconcile(config)
    held = held_volumes(config)
    if held:
        _refuse_held(held, reconciled["errors"], serving_csi)
    if operation.retry_pending(config)["pending"]:
        raise DriverError("some pod tokens could not be revoked yet (Vault unreachable?); nothing was removed: "
                          "make Vault reachable and run uninstall again (`vaulttmpfs status` lists them)")
    if revoke:
        _refuse_without_a_driver(config, plugin_dir)
    token = _revoke_generator(config) if revoke else {"path": config.generator_token_path, "kept": True}
    removed = _remove_driver(plugin_dir)  # last: it may delete the bundle this process runs from
    logger.info("uninstalled", removed=removed, generator_revoked=token.get("revoked"),
                accessor=log.accessor_hint(token.get("accessor")))
    return {"removed": removed, "generator": token, "plugin_dir": plugin_dir}


def _refuse_held(held: list[VolumeRecord], reconcile_errors: list[str], serving_csi: bool) -> None:
    message = (f"{len(held)} vaulttmpfs volume(s) still mounted, held by: {', '.join(sorted(_who(r) for r in held))}; "
               "delete those pods (or drain the node) and run uninstall again")
    if serving_csi:
        message += "; meanwhile this process serves their CSI teardown (NodeUnpublishVolume)"
    elif any(f"/volumes/{CSI.plugin_dir}/" in r.mount_dir for r in held):
        # The agent being replaced was the CSI socket's only server: without one, deleted pods never finish.
        message += ("; the kubelet tears CSI volumes down only through the CSI plugin, so keep one serving until they "
                    "are gone: the agent, or `vaulttmpfs uninstall --wait --csi-endpoint` (in the cluster: the "
                    "uninstall component listed after csi, as variants/csi-uninstall does)")
    if reconcile_errors:
        # e.g. the pods dir not visible here: a pod already gone then looks like one still holding its volume.
        message += f"; but reconcile could not judge them, so some may be gone already: {'; '.join(reconcile_errors)}"
    raise DriverError(message)


def _refuse_without_a_driver(config: Config, plugin_dir: str) -> None:
    """A generator token but no driver here: the driver is most likely in another plugin dir (GKE's,
    volumeplugins), and revoking the token would leave it installed, failing every mount."""
    driver_dir = os.path.join(plugin_dir, install.DRIVER_DIR)
    if os.path.lexists(driver_dir) or not os.path.lexists(config.generator_token_path):
        return  # a driver to remove, or nothing left to revoke either (an uninstall run again)
    raise DriverError(f"no driver in {driver_dir}, so the generator token was left alive and nothing removed: "
                      "pass --plugin-dir (VAULTTMPFS_PLUGIN_DIR) the kubelet's --volume-plugin-dir, where "
                      "`vaulttmpfs install` put the driver (e.g. /home/kubernetes/flexvolume on GKE)")


def _revoke_generator(config: Config) -> dict[str, Any]:
    path = config.generator_token_path
    token = generator.existing_token(path)
    result: dict[str, Any] = {"path": path, "revoked": False, "file_removed": False}
    if token:
        log.secret(token)
        client = Vault(config, token)
        try:
            try:
                result["accessor"] = client.lookup_self().get("accessor", "")
            except VaultDenied:
                result["already_invalid"] = True  # expired or revoked: nothing left to revoke
            else:
                # By accessor: the generator policy allows revoke-accessor (for pod tokens), not revoke-self.
                result["revoked"] = client.revoke_accessor(result["accessor"])
        except DriverError as exc:
            raise DriverError(f"cannot revoke the generator token in {path}: {exc}; nothing was removed") from None
    try:
        os.unlink(path)
        result["file_removed"] = True
    except FileNotFoundError:
        pass
    except OSError as exc:
        result["file_error"] = f"{exc.strerror}; delete {path} on the node"
    return result


def _remove_driver(plugin_dir: str) -> list[str]:
    driver_dir = os.path.join(plugin_dir, install.DRIVER_DIR)
    if not os.path.isdir(plugin_dir):
        return []
    removed = []
    with install._locked(plugin_dir):
        trash = os.path.join(plugin_dir, TRASH)
        install._remove(trash)
        if os.path.lexists(driver_dir):
            os.rename(driver_dir, trash)  # the one change the kubelet sees: the driver is gone, whole
            removed.append(driver_dir)
        for leftover in (trash, os.path.join(plugin_dir, install.STAGING)):
            install._remove(leftover)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(plugin_dir, install.LOCK))
    return removed


def summary(result: dict[str, Any]) -> list[str]:
    token = result["generator"]
    if token.get("kept"):
        line = f"generator token kept (--keep-token): {token['path']}"
        removed = ", ".join(result["removed"]) or f"nothing (no driver in {result['plugin_dir']})"
        return [line, f"removed {removed}"]
    if token.get("revoked"):
        line = f"generator token revoked (accessor {token.get('accessor', '')[:8]})"
    elif token.get("already_invalid"):
        line = "generator token was already expired or revoked"
    else:
        line = "no generator token revoked"
    line += f"; {token['path']} " + ("removed" if token.get("file_removed") else
                                     f"left: {token['file_error']}" if token.get("file_error") else "absent")
    removed = ", ".join(result["removed"]) or f"nothing (no driver in {result['plugin_dir']})"
    return [line, f"removed {removed}"]
