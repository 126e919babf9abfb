"""Executable entry: kubelet calls go to `protocol` (no click, no hvac); everything else to `cli`.

Which is which, by the call's shape: the kubelet's verbs (pkg/volume/flexvolume) go to the
protocol whatever their arguments (a malformed one gets a JSON Failure, as the kubelet expects).
An unknown first word goes to the protocol only if the rest looks like a kubelet call (a JSON
object or an absolute path: every kubelet verb carries one), so a verb a newer kubelet adds gets
{"status": "Not supported"}; a typo on a terminal (`vaulttmpfs bootsrap`) gets click's usage error.
"""

# No `from __future__ import annotations` (it imports __future__ at run time, ~0.1 ms of `init`): these
# annotations are valid at run time.
import sys

# Operator commands (click); never a kubelet call, whatever their arguments.
CLI_COMMANDS = {"bootstrap", "renew-generator", "agent", "install", "retry-revocations", "reconcile", "version",
                "doctor", "status", "uninstall", "token"}
KUBELET_VERBS = {"init", "mount", "unmount", "attach", "detach", "waitforattach", "isattached", "mountdevice",
                 "unmountdevice", "getvolumename", "expandvolume", "expandfs"}


def is_kubelet_call(argv: list[str]) -> bool:
    if not argv or argv[0] in CLI_COMMANDS:
        return False
    if argv[0] in KUBELET_VERBS:
        return True
    return not argv[0].startswith("-") and any(arg.startswith(("{", "/")) for arg in argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not is_kubelet_call(argv):
        from .cli import main as cli_main

        return cli_main(argv)
    from .flexvolume.protocol import main as protocol_main

    return protocol_main(argv)
