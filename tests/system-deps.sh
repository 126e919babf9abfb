#!/bin/sh
# The Debian packages make needs, installed when we are root, else named in one `apt-get install`
# line for root to run. Argument: venv (the interpreter PYTHON can make .venv: Debian's python3
# needs python3.X-venv for ensurepip), demo (that, plus mount tools and, when not root, the user
# namespace tools), test (that, plus slapd, ldap-utils, openssl, git and binutils (objdump: the
# bundle's glibc floor) for the suite).
set -eu
need=${1:-test}
PYTHON=${PYTHON:-python3}
pairs=""
if [ "$need" != venv ]; then
    # make runs the demo and the suite under tests/userns.sh (unshare); not as root, it also needs
    # the setuid id mappers.
    pairs="findmnt:util-linux unshare:util-linux mount:mount"
    [ "$(id -u)" = 0 ] || pairs="$pairs newuidmap:uidmap newgidmap:uidmap"
fi
# make e2e: a real container runtime (Debian's containerd + runc), the sidecars' xz, `ip` for the
# run's own loopback, mmdebstrap for the node OS chroot. Root only
# (it runs containerd).
if [ "$need" = e2e ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "make e2e runs containerd and mounts for the kubelet: run it as root" >&2
        exit 1
    fi
    pairs="$pairs containerd:containerd runc:runc ctr:containerd xz:xz-utils ip:iproute2 mmdebstrap:mmdebstrap"
fi
# The suite also checks tests/userns.sh's answer to a plain user, so uidmap even as root.
# promtool (Debian's prometheus package) parses the monitoring examples' PromQL (tests/test_inventory.py).
[ "$need" != test ] || pairs="$pairs slapd:slapd ldapadd:ldap-utils openssl:openssl git:git newuidmap:uidmap objdump:binutils"
[ "$need" != test ] || pairs="$pairs promtool:prometheus"

missing=""
for pair in $pairs; do
    tool=${pair%%:*}; package=${pair#*:}
    case " $missing " in *" $package "*) continue ;; esac
    PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || missing="$missing $package"
done
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    missing="$missing $("$PYTHON" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"
fi
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "make $need needs Debian packages that are not installed; as root run:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends$missing" >&2
    exit 1
fi
echo "installing from Debian:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# slapd's debconf questions take their defaults; the tests run their own slapd.
apt-get install -y -q --no-install-recommends $missing
