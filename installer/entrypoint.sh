#!/bin/sh
# The installer container's entrypoint: install the driver into the host's plugin dir
# ($VAULTTMPFS_PLUGIN_DIR, atomic and a no-op when already there), then become the node agent.
# A failed install exits non-zero, so the pod crash-loops visibly instead of serving a half install.
# Arguments are passed to `vaulttmpfs agent`.
set -eu
bundle="${VAULTTMPFS_BUNDLE:-/opt/vaulttmpfs}"
"$bundle/vaulttmpfs" install --source "$bundle"
exec "$bundle/vaulttmpfs" agent "$@"
