"""Executable entry: kubelet verbs go to `protocol` (no click, no hvac); operator commands to `cli`."""

from __future__ import annotations

import sys

# Operator commands; every other first argument is a kubelet verb (unknown ones: "Not supported").
CLI_COMMANDS = {"bootstrap", "renew-generator", "agent", "install", "retry-revocations", "version",
                "doctor", "status", "uninstall", "token"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in CLI_COMMANDS or argv[0].startswith("-"):
        from .cli import main as cli_main

        return cli_main(argv)
    from .flexvolume.protocol import main as protocol_main

    return protocol_main(argv)
