#!/usr/bin/env bash
# nftlb-rs demo: runs the real daemon in a throwaway lab of network namespaces
# and sends live traffic through the load balancer it programs.
#
#   cli (198.18.0.2) --veth-- lb (front 198.18.0.1, VIP 198.18.0.100)
#                              lb (bridge "back" 198.18.1.1) --veth-- be1 198.18.1.11
#                                                            --veth-- be2 198.18.1.12
#                                                            --veth-- be3 198.18.1.13
#
# Nothing is created in the root namespace: every veth end is created directly
# inside its namespace. On exit (success, failure or Ctrl-C) the script kills
# only the processes it started and deletes only its own namespaces.
#
# Usage: bash scripts/demo.sh [--no-build] [--lab-only]
#   --no-build   use the existing target/release binaries
#   --lab-only   only build the lab, check it is wired correctly and tear it
#                down (no build, no daemon; checks the plumbing)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

BUILD=1
LAB_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --no-build) BUILD=0 ;;
        --lab-only) LAB_ONLY=1; BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "demo.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"

if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
    PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: must run as root (it creates network namespaces)" >&2
    exit 1
fi

if [ -t 1 ]; then BOLD=$'\e[1m'; DIM=$'\e[2m'; RESET=$'\e[0m'; else BOLD=; DIM=; RESET=; fi
SECTION=0
section() { SECTION=$((SECTION + 1)); printf '\n%s== %d. %s ==%s\n' "$BOLD" "$SECTION" "$*" "$RESET"; }
note() { printf '%s%s%s\n' "$DIM" "$*" "$RESET"; }
die() { printf 'demo.sh: ERROR: %s\n' "$*" >&2; exit 1; }
# failed RC MESSAGE: a command failed; a child killed by Ctrl-C means the user
# interrupted the demo, anything else is an error.
failed() {
    local rc="$1"
    shift
    if [ "$rc" -eq 130 ]; then echo "interrupted" >&2; exit 130; fi
    die "$* (exit $rc)"
}

# ---------------------------------------------------------------------------
# Lab names and cleanup (installed before anything is created)
# ---------------------------------------------------------------------------
PREFIX="nlbdemo-$$-"
NS_CLI="${PREFIX}cli"
NS_LB="${PREFIX}lb"
BACKENDS=(be1 be2 be3)
CREATED_NS=()   # namespaces this run created (recorded before creation)
PIDS=()         # processes this run started in the background
WORKDIR=""
DAEMON_PID=""

VIP=198.18.0.100
API_PORT=5555
API="http://127.0.0.1:${API_PORT}"
NFTLB="$REPO/target/release/nftlb"
LAB="$REPO/target/release/nftlb-lab"

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -n "$WORKDIR" ] && [ -s "$WORKDIR/nftlb.log" ]; then
        section "Daemon log (last 30 lines, for the failure above)"
        tail -n 30 "$WORKDIR/nftlb.log"
    fi
    section "Cleanup"
    local pid i
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    # Bounded wait (5 s) for a graceful exit, then SIGKILL.
    for i in $(seq 50); do
        local alive=0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "process $pid did not stop after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    [ "${#PIDS[@]}" -gt 0 ] && echo "stopped ${#PIDS[@]} process(es): ${PIDS[*]}"

    local ns leftover
    for ns in "${CREATED_NS[@]}"; do
        ip netns list 2>/dev/null | grep -q "^${ns}\( \|$\)" || continue
        # Anything still inside one of our private namespaces was started by
        # this run (a child of a process above); it must go before the netns.
        leftover="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        if [ -n "${leftover// /}" ]; then
            echo "killing leftover processes in $ns: $leftover"
            # shellcheck disable=SC2086
            kill -KILL $leftover 2>/dev/null
        fi
        ip netns del "$ns" || echo "warning: could not delete namespace $ns" >&2
    done
    [ "${#CREATED_NS[@]}" -gt 0 ] && echo "deleted namespaces: ${CREATED_NS[*]}"
    [ -n "$WORKDIR" ] && rm -rf "$WORKDIR"

    if ip netns list 2>/dev/null | grep -q "^${PREFIX}"; then
        echo "warning: namespaces of this run remain:" >&2
        ip netns list | grep "^${PREFIX}" >&2
        [ "$rc" -eq 0 ] && rc=1
    fi
    if [ "$rc" -eq 0 ]; then
        printf '%sDemo finished successfully.%s\n' "$BOLD" "$RESET"
    elif [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then
        printf '%sDemo interrupted (exit %d).%s\n' "$BOLD" "$rc" "$RESET" >&2
    else
        printf '%sDemo FAILED (exit %d).%s\n' "$BOLD" "$rc" "$RESET" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
ns_add() {
    CREATED_NS+=("$1")
    ip netns add "$1"
    ip -n "$1" link set lo up
}

# tcp_probe NS IP PORT -> prints "open", "refused" or "unreachable" (1 s bound).
tcp_probe() {
    local out
    if out="$(ip netns exec "$1" timeout 1 bash -c "exec 3<>/dev/tcp/$2/$3" 2>&1)"; then
        echo open
    elif [[ "$out" == *"refused"* ]]; then
        echo refused
    else
        echo unreachable
    fi
}

# expect_reach NS IP PORT WANT... : fail unless tcp_probe returns one of WANT.
expect_reach() {
    local ns="$1" ip="$2" port="$3" got
    shift 3
    got="$(tcp_probe "$ns" "$ip" "$port")"
    printf '  %-6s -> %-15s tcp/%-5s %s\n' "${ns#"$PREFIX"}" "$ip" "$port" "$got"
    local want
    for want in "$@"; do [ "$got" = "$want" ] && return 0; done
    die "lab wiring: ${ns#"$PREFIX"} cannot reach $ip:$port (got '$got', wanted: $*)"
}

# api METHOD PATH [BODY]: call the REST API from inside the lb namespace,
# show the request and the response, and fail unless the status is 200.
api() {
    local method="$1" path="$2" body="${3-}" code
    local args=(-sS --max-time 10 -X "$method" -H "Key: $KEY" -o "$WORKDIR/response" -w '%{http_code}')
    if [ -n "$body" ]; then
        args+=(--data-binary "$body")
        # shellcheck disable=SC2016
        printf '%s$ curl -H "Key: $KEY" -X %s %s%s -d @body.json%s\n' "$DIM" "$method" "$API" "$path" "$RESET"
    else
        # shellcheck disable=SC2016
        printf '%s$ curl -H "Key: $KEY" -X %s %s%s%s\n' "$DIM" "$method" "$API" "$path" "$RESET"
    fi
    code="$(ip netns exec "$NS_LB" curl "${args[@]}" "$API$path")" || failed $? "curl $method $path failed"
    cat "$WORKDIR/response"
    echo
    echo "-> HTTP $code"
    [ "$code" = 200 ] || die "$method $path returned HTTP $code"
}

probe() {
    printf '%s$ ip netns exec %s nftlb-lab probe --addr %s --port 80 --count 20 --interval-ms 50%s\n' \
        "$DIM" "${NS_CLI#"$PREFIX"}" "$VIP" "$RESET"
    timeout --foreground 60 ip netns exec "$NS_CLI" "$LAB" probe --addr "$VIP" --port 80 --count 20 --interval-ms 50 \
        || failed $? "probe failed"
}

# ---------------------------------------------------------------------------
# 1. Dependencies and build
# ---------------------------------------------------------------------------
section "Installing missing dependencies"
bash scripts/install-deps.sh
echo "ok: every package scripts/install-deps.sh lists is installed"

if [ "$BUILD" -eq 1 ]; then
    section "Building (cargo build --release)"
    command -v cargo >/dev/null 2>&1 || die "cargo not found; install the Rust toolchain first"
    cargo build --release --locked
fi
if [ "$LAB_ONLY" -eq 0 ]; then
    for bin in "$NFTLB" "$LAB"; do
        if [ ! -x "$bin" ]; then
            [ "$BUILD" -eq 1 ] && die "$bin was not built"
            die "$bin not found (run without --no-build to build it)"
        fi
    done
fi

others="$(ip netns list 2>/dev/null | grep -o '^nlbdemo-[^ ]*' || true)"
if [ -n "$others" ]; then
    note "note: namespaces of another demo run exist (left alone): $(echo "$others" | tr '\n' ' ')"
fi

# ---------------------------------------------------------------------------
# 2. The lab
# ---------------------------------------------------------------------------
section "Building the lab (namespaces ${PREFIX}*)"
cat <<EOF
  cli 198.18.0.2/24 ---- front: lb 198.18.0.1/24 + VIP $VIP   (forwarding on)
                          back (bridge): lb 198.18.1.1/24
                            |-- be1 198.18.1.11   |-- be2 198.18.1.12   |-- be3 198.18.1.13
EOF
ns_add "$NS_CLI"
ns_add "$NS_LB"
for be in "${BACKENDS[@]}"; do ns_add "${PREFIX}${be}"; done

# client <-> lb front side
ip link add eth0 netns "$NS_CLI" type veth peer name front netns "$NS_LB"
ip -n "$NS_CLI" addr add 198.18.0.2/24 dev eth0
ip -n "$NS_CLI" link set eth0 up
ip -n "$NS_CLI" route add default via 198.18.0.1
ip -n "$NS_LB" addr add 198.18.0.1/24 dev front
ip -n "$NS_LB" addr add "$VIP/32" dev front
ip -n "$NS_LB" link set front up

# lb back side: a bridge with one veth per backend
ip -n "$NS_LB" link add back type bridge
ip -n "$NS_LB" addr add 198.18.1.1/24 dev back
ip -n "$NS_LB" link set back up
ip netns exec "$NS_LB" sysctl -qw net.ipv4.ip_forward=1
i=0
for be in "${BACKENDS[@]}"; do
    i=$((i + 1))
    ns="${PREFIX}${be}"
    ip link add eth0 netns "$ns" type veth peer name "$be" netns "$NS_LB"
    ip -n "$NS_LB" link set "$be" master back
    ip -n "$NS_LB" link set "$be" up
    ip -n "$ns" addr add "198.18.1.1${i}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via 198.18.1.1
done
echo "namespaces: $(ip netns list | grep -o "^${PREFIX}[^ ]*" | sort | tr '\n' ' ')"

section "Checking the lab wiring (TCP to a closed port: 'refused' means reachable)"
expect_reach "$NS_CLI" 198.18.0.1 9 refused
expect_reach "$NS_CLI" "$VIP" 9 refused
for be in "${BACKENDS[@]}"; do
    i="${be#be}"
    expect_reach "$NS_LB" "198.18.1.1${i}" 9 refused
    # Backend -> client goes through lb's forwarding.
    expect_reach "${PREFIX}${be}" 198.18.0.2 9 refused
done

echo "lb interfaces:"
ip -n "$NS_LB" -4 -br addr show | sed 's/^/  /'

if [ "$LAB_ONLY" -eq 1 ]; then
    echo "lab OK (--lab-only: not starting the daemon)"
    exit 0
fi

WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/nlbdemo-$$.XXXXXX")"
KEY="demo-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

# ---------------------------------------------------------------------------
# 3. Backends and daemon
# ---------------------------------------------------------------------------
section "Starting backend servers (nftlb-lab serve --port 8080)"
for be in "${BACKENDS[@]}"; do
    ip netns exec "${PREFIX}${be}" "$LAB" serve --name "$be" --port 8080 \
        >"$WORKDIR/$be.log" 2>&1 &
    PIDS+=("$!")
    echo "  $be: pid $!"
done
for be in "${BACKENDS[@]}"; do
    ip="198.18.1.1${be#be}"
    for _ in $(seq 50); do
        [ "$(tcp_probe "$NS_LB" "$ip" 8080)" = open ] && break
        sleep 0.1
    done
    [ "$(tcp_probe "$NS_LB" "$ip" 8080)" = open ] || {
        cat "$WORKDIR/$be.log" >&2
        die "$be is not listening on $ip:8080 after 5 s"
    }
done
echo "all backends listening"

section "Starting the nftlb daemon in lb"
printf '%s$ nftlb -k <key> -H 127.0.0.1 -P %s --state-file %s -L 2%s\n' \
    "$DIM" "$API_PORT" "$WORKDIR/state.json" "$RESET"
ip netns exec "$NS_LB" "$NFTLB" -k "$KEY" -H 127.0.0.1 -P "$API_PORT" \
    --state-file "$WORKDIR/state.json" -L 2 >"$WORKDIR/nftlb.log" 2>&1 &
DAEMON_PID=$!
PIDS+=("$DAEMON_PID")
echo "daemon pid $DAEMON_PID, key $KEY"
ready=0
for _ in $(seq 100); do
    if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
        die "the daemon exited during start-up"
    fi
    code="$(ip netns exec "$NS_LB" curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
        -H "Key: $KEY" "$API/farms" || true)"
    if [ "$code" = 200 ]; then ready=1; break; fi
    sleep 0.1
done
if [ "$ready" -ne 1 ]; then
    die "the API did not answer 200 on GET /farms within 10 s (last status: ${code:-none})"
fi
echo "API ready on $API (inside lb)"

# ---------------------------------------------------------------------------
# 4. Create a farm
# ---------------------------------------------------------------------------
FARM_JSON='{"farms":[{"name":"web","family":"ipv4","virtual-addr":"198.18.0.100","virtual-ports":"80","protocol":"tcp","mode":"snat","scheduler":"weight","state":"up","backends":[{"name":"be1","ip-addr":"198.18.1.11","port":"8080","weight":"1","state":"up"},{"name":"be2","ip-addr":"198.18.1.12","port":"8080","weight":"2","state":"up"},{"name":"be3","ip-addr":"198.18.1.13","port":"8080","weight":"1","state":"up"}]}]}'

section "Creating farm 'web': VIP $VIP:80/tcp -> be1, be2, be3 :8080 (weights 1:2:1, snat)"
note "body.json: $FARM_JSON"
api POST /farms "$FARM_JSON"

section "GET /farms/web"
api GET /farms/web

section "nft list ruleset (in lb)"
ip netns exec "$NS_LB" nft list ruleset

# ---------------------------------------------------------------------------
# 5. Live traffic
# ---------------------------------------------------------------------------
section "Traffic: 20 requests from cli to $VIP:80 (snat: backends see lb's 198.18.1.1; be2 ~ half)"
probe

section "Change: backend be2 off (maintenance: no new connections)"
BE2_OFF='{"farms":[{"name":"web","backends":[{"name":"be2","state":"off"}]}]}'
note "body.json: $BE2_OFF"
api POST /farms "$BE2_OFF"

section "Traffic again: be2 gets nothing"
probe

section "Change: mode dnat (backends see the real client address)"
DNAT='{"farms":[{"name":"web","mode":"dnat"}]}'
note "body.json: $DNAT"
api POST /farms "$DNAT"

section "Traffic in dnat mode: backends see client 198.18.0.2"
probe

section "A hand edit: 'nft flush table ip nftlb' (the daemon sees it and repairs it)"
printf '%s$ ip netns exec %s nft flush table ip nftlb%s\n' "$DIM" "$NS_LB" "$RESET"
ip netns exec "$NS_LB" nft flush table ip nftlb || failed $? "nft flush failed"
for _ in $(seq 1 50); do
    grep -q "kernel rules repaired" "$WORKDIR/nftlb.log" 2>/dev/null && break
    sleep 0.1
done
grep -E "changed from outside|differ from the desired|kernel rules repaired" "$WORKDIR/nftlb.log" | tail -3 | cut -c1-200
grep -q "kernel rules repaired" "$WORKDIR/nftlb.log" || failed 1 "the hand edit was not repaired within 5 s"

section "Traffic after the repair"
probe

section "GET /farms/web (final state)"
api GET /farms/web

if [ -s "$WORKDIR/state.json" ]; then
    section "Persisted state ($WORKDIR/state.json, first 40 lines)"
    head -n 40 "$WORKDIR/state.json"
    echo
fi

section "Daemon log (last 20 lines)"
tail -n 20 "$WORKDIR/nftlb.log" || true
