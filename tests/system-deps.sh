#!/bin/sh
# The Debian packages the suite needs: installed when we are root, else named in one line to run.
set -eu
missing=""
for pair in slapd:slapd ldapadd:ldap-utils unshare:util-linux openssl:openssl; do
    tool=${pair%%:*}; package=${pair#*:}
    PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "the suite needs Debian packages that are not installed; as root run:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends$missing" >&2
    exit 1
fi
echo "installing from Debian:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# slapd's debconf questions take their defaults; the tests run their own slapd.
apt-get install -y -q --no-install-recommends $missing
