#!/usr/bin/env bash
# Install the Debian 12 packages that nftlb-rs needs to build, test and demo.
#
# Idempotent: packages already installed are left alone, and `apt-get update`
# only runs when something is missing. Quiet on success; on failure it prints
# apt's output and exits non-zero. Must run as root (or with sudo available).
set -euo pipefail

# nftables         `nft` for inspecting rulesets (the demo and tests list them)
# libnftables-dev  headers and libnftables.so: the daemon links libnftables
# pkg-config       finds libnftables at build time
# make             builds jemalloc (the daemon's allocator) from source
# iproute2         `ip netns`, veth pairs and bridges for the lab and tests
# conntrack        inspecting/flushing connection tracking entries
# curl             talking to the REST API
# procps           sysctl, pgrep, ps
# vsftpd           a real FTP server for the ftp-helper test (run by the test in a
#                  namespace; the package's own service is kept from starting)
PACKAGES=(nftables libnftables-dev pkg-config make iproute2 conntrack curl procps vsftpd)

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: missing packages (${missing[*]}) and apt-get is not available;" \
         "this script supports Debian 12 only" >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-deps: missing packages (${missing[*]}); run this script as root" >&2
        exit 1
    fi
fi

echo "install-deps: installing ${missing[*]}"
log="$(mktemp "${TMPDIR:-/tmp}/install-deps.XXXXXX")"
trap 'rm -f "$log"' EXIT

run_logged() {
    if ! "$@" >"$log" 2>&1; then
        echo "install-deps: command failed: $*" >&2
        cat "$log" >&2
        exit 1
    fi
}

export DEBIAN_FRONTEND=noninteractive
# Keep packages (vsftpd) from starting services on the host while they install.
policy=/usr/sbin/policy-rc.d
own_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    own_policy=1
fi
cleanup() {
    rm -f "$log"
    if [ -n "$own_policy" ]; then "${SUDO[@]}" rm -f "$policy"; fi
}
trap cleanup EXIT
run_logged "${SUDO[@]}" apt-get update -q
run_logged "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# Verify rather than trust apt's exit code.
still_missing=()
for pkg in "${missing[@]}"; do
    is_installed "$pkg" || still_missing+=("$pkg")
done
if [ "${#still_missing[@]}" -ne 0 ]; then
    echo "install-deps: still not installed after apt-get: ${still_missing[*]}" >&2
    exit 1
fi
echo "install-deps: done"
