#!/bin/sh
# Run a command (make demo, make test, make bench) in its own mount namespace; when not root, as
# root of a new user namespace too: real tmpfs mounts without real root.
# Root inside is the invoking user outside; ids 1..N inside are the user's subordinate ids
# (/etc/subuid, /etc/subgid, mapped by the setuid newuidmap/newgidmap of Debian's `uidmap`),
# so every uid/gid the demo and the tests use (fsGroup 1000 and 2000, nobody 65534, ...) exists
# in the namespace and mount -o gid=..., chown and setuid behave as they do for real root.
set -eu
if [ "${1:-}" = --new-root ]; then
    # Second stage, as root of the new namespaces. The host's / and /tmp belong to real root,
    # which a user namespace cannot map (they show as uid 65534), and the driver trusts only
    # paths whose every directory from / down is root's (sshd's rule). So: a / of our own (a
    # tmpfs at $2 holding the host's top-level entries bound in, and a fresh 1777 /tmp), chroot.
    # The same for /etc, where the driver's default config path starts: a dir of our own holding
    # the host's entries (a missing /etc/vaulttmpfs is then "no config", as on a node).
    root=$2 dir=$3
    shift 3
    mount -t tmpfs -o mode=0755 vaulttmpfs-root "$root"
    bind_entries() { # host dir $1 (/ or /etc/) into our dir $2, but for the names in $3
        for entry in "$1"* "$1".[!.]*; do
            name=${entry#"$1"}
            [ -e "$entry" ] || [ -L "$entry" ] || continue
            case " $3 " in *" $name "*) continue ;; esac
            if [ "$entry" = "$root" ]; then
                continue
            elif [ -L "$entry" ]; then
                ln -s "$(readlink "$entry")" "$2/$name"
            elif [ -d "$entry" ]; then
                mkdir "$2/$name" && mount --rbind "$entry" "$2/$name"
            else
                : >"$2/$name" && mount --bind "$entry" "$2/$name"
            fi
        done
    }
    bind_entries / "$root" "tmp etc"
    mkdir "$root/etc" && bind_entries /etc/ "$root/etc" ""
    mkdir -m 1777 "$root/tmp"
    chroot=$(PATH="$PATH:/usr/sbin:/sbin" command -v chroot)
    TMPDIR=/tmp exec "$chroot" "$root" /bin/sh -c 'cd "$0" && exec "$@"' "$dir" "$@"
fi
if [ "$(id -u)" = 0 ]; then
    # Real root needs no id mapping; a private mount namespace alone makes the run's tmpfs
    # mounts go away with it, even when it is killed (kill -9) before it could unmount them.
    exec unshare --mount --propagation private "$@"
fi
user=$(id -un)
uid=$(id -u)
NEED=65535 # inner ids 1..65535: everything up to and including nobody (65534)

fail() {
    echo "tests/userns.sh: $*" >&2
    exit 1
}

# "start count" of the user's first subordinate range in $1 (/etc/subuid or /etc/subgid).
first_range() {
    flag=$([ "$1" = /etc/subgid ] && echo -g || true)
    if command -v getsubids >/dev/null 2>&1; then # also sees ranges from NSS, not only the file
        getsubids $flag "$user" 2>/dev/null | awk 'NR == 1 { print $3, $4 }'
    elif [ -r "$1" ]; then
        awk -F: -v u="$user" -v n="$uid" '($1 == u || $1 == n) { print $2, $3; exit }' "$1"
    fi
}

# A start past every range already given out, for the fix we suggest.
free_start() {
    cat /etc/subuid /etc/subgid 2>/dev/null |
        awk -F: 'BEGIN { top = 100000 } ($2 + $3 > top) { top = $2 + $3 } END { print top }'
}

command -v newuidmap >/dev/null 2>&1 && command -v newgidmap >/dev/null 2>&1 ||
    fail "newuidmap/newgidmap are missing; as root run: apt-get install -y uidmap"
uids=$(first_range /etc/subuid)
gids=$(first_range /etc/subgid)
if [ -z "$uids" ] || [ -z "$gids" ] || [ "${uids#* }" -lt "$NEED" ] || [ "${gids#* }" -lt "$NEED" ]; then
    start=$(free_start)
    fail "user $user needs $NEED subordinate uids and gids (/etc/subuid, /etc/subgid) to map the ids the" \
        "tests use; it has uids: ${uids:-none}, gids: ${gids:-none}. As root run:
  usermod --add-subuids $start-$((start + 65535)) --add-subgids $start-$((start + 65535)) $user"
fi
unshare --user true 2>/dev/null ||
    fail "unprivileged user namespaces are disabled here (sysctl kernel.unprivileged_userns_clone=0," \
        "kernel.apparmor_restrict_unprivileged_userns=1, or a container without them): run as root instead"
case $PWD/ in /tmp/*) fail "as a plain user the run gets a /tmp of its own: run it from a checkout outside /tmp" ;; esac
mountpoint=$(mktemp -d /tmp/vaulttmpfs-root.XXXXXX)
status=0
unshare --map-root-user --map-users="${uids% *},1,${uids#* }" --map-groups="${gids% *},1,${gids#* }" \
    --mount --propagation private "$0" --new-root "$mountpoint" "$PWD" "$@" || status=$?
rmdir "$mountpoint"
exit $status
