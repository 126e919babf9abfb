#!/bin/sh
# Run a command as root of a new user+mount namespace (tmpfs mounts without real root).
exec unshare --user --map-root-user --mount "$@"
