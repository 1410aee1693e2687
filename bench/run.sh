#!/usr/bin/env bash
# The benchmark suite: nftlb-rs against the original nftlb, kube-proxy-style nftables,
# iptables (legacy and nft) DNAT chains, HAProxy (tcp mode) and the floors (routing only,
# routing + conntrack, one netdev forward rule), side by side in one run.
#
#   bash bench/run.sh [--smoke | --full] [--out DIR] [--only SYSTEMS]
#   bash bench/run.sh --check-only [--no-install] [--no-build]
#
#   --smoke       (default) small farm counts (1, 1000), one pass, <= 5 minutes
#   --full        adds 10,000 and 100,000 farms (ours; comparators up to 10,000), more probes
#   --check-only  correctness only (what CI runs): tiny farm counts, every system must
#                 apply, forward connections to its backends and take changes; no timings
#                 are reported; exit status 1 if anything failed
#   --out DIR     results directory (default bench/results/<UTC date-time>-<tier>)
#   --only LIST   comma-separated systems: floors,ours,dsr,orig,kube-nft,ipt-legacy,ipt-nft,haproxy
#   --no-install  do not apt-get install missing packages (systems whose tools are
#                 missing are skipped and said so)
#   --no-build    use existing binaries (NFTLB_BIN, BENCH_BIN or target/release/*)
#
# Writes DIR/results.jsonl (one record per measurement), DIR/results.md (the tables) and
# DIR/*.png (apply time, change latency and new-connection latency against farm count),
# and prints the tables. Everything runs in network namespaces named nlbb-<pid>-*, created
# and deleted by this script (also on error or Ctrl-C); the processes it starts are
# tracked by PID and only those are stopped. Topology per case:
#
#   cli 198.19.255.2 --veth-- 198.19.255.1 lb 198.19.254.1 --veth-- 198.19.254.2 be
#   (prober, CPU0)            (system under test; its softirq   (servers, CPU0; backend
#                              work steered to CPU1 with RPS)     addresses 198.19.0.x on lo)
#
# VIPs: farm i -> 198.18.x.y port 80 (+1 above 65,535 farms); backends 198.19.0.1-8:8080.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

TIER=smoke
CHECK=0
INSTALL=1
BUILD=1
OUT=""
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) TIER=smoke ;;
    --full) TIER=full ;;
    --check-only) CHECK=1 ;;
    --no-install) INSTALL=0 ;;
    --no-build) BUILD=0 ;;
    --out) OUT=$2; shift ;;
    --only) ONLY=$2; shift ;;
    -h | --help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "run.sh: must run as root (network namespaces)" >&2; exit 1; }
[ "$CHECK" = 1 ] && TIER=check

# ------------------------------------------------------------------ tier parameters
M=8 # backends per farm
case "$TIER" in
  check)
    OURS_N="1 50"; CMP_N="1 50"; ORIG_N="1 50"; HAPROXY_N="1"; DSR_N="1"
    RATE=500; PROBES=100; WARMUP=0; CHANGES=8; ORIG_CHANGES=8; CLI_CHANGES=4
    BULK_BYTES=$((16 << 20)); BL_ELEMENTS=1000; BL_AT="50"; RESTART_AT="50"
    CHANGE_SECONDS=30 ;;
  smoke)
    OURS_N="1 1000"; CMP_N="1 1000"; ORIG_N="1 1000"; HAPROXY_N="1"; DSR_N="1 1000"
    RATE=1000; PROBES=3000; WARMUP=200; CHANGES=200; ORIG_CHANGES=40; CLI_CHANGES=20
    BULK_BYTES=$((1 << 30)); BL_ELEMENTS=1000000; BL_AT="1000"; RESTART_AT="1000"
    CHANGE_SECONDS=30 ;;
  full)
    OURS_N=${OURS_N:-"1 1000 10000 100000"}; CMP_N=${CMP_N:-"1 1000 10000"}
    ORIG_N=${ORIG_N:-"1 1000"}; HAPROXY_N=${HAPROXY_N:-"1 1000"}; DSR_N=${DSR_N:-"1 1000 10000"}
    RATE=1000; PROBES=10000; WARMUP=500; CHANGES=400; ORIG_CHANGES=60; CLI_CHANGES=40
    BULK_BYTES=$((4 << 30)); BL_ELEMENTS=1000000; BL_AT="100000"
    RESTART_AT="1000 10000 100000"; CHANGE_SECONDS=90 ;;
esac
DSR_APPLY_TIMEOUT=${DSR_APPLY_TIMEOUT:-180}
ORIG_M=2 # the original cannot hold more than 4,095 backends in total

want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ------------------------------------------------------------------ install, build
PKGS=(nftlb haproxy iptables gnuplot-nox)
installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
if [ "$INSTALL" = 1 ]; then
  bash scripts/install-deps.sh
  missing=()
  for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    # Keep packages (haproxy) from starting their services on the host.
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
      own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q > /dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null
    [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
  fi
fi
if [ "$BUILD" = 1 ]; then
  log "building release binaries"
  cargo build --release --quiet --bin nftlb --bin nftlb-bench
fi
NFTLB=${NFTLB_BIN:-$ROOT/target/release/nftlb}
BENCH=${BENCH_BIN:-$ROOT/target/release/nftlb-bench}
ORIG=/usr/sbin/nftlb
[ -x "$NFTLB" ] && [ -x "$BENCH" ] || { echo "run.sh: binaries missing ($NFTLB, $BENCH)" >&2; exit 1; }

if [ -z "$OUT" ]; then
  OUT=$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-$TIER
fi
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
J=$OUT/results.jsonl
: > "$J"
TMP=$(mktemp -d /tmp/nlbb.XXXXXX)

# ------------------------------------------------------------------ processes, cleanup
PREFIX="nlbb-$$-"
PIDS=()
LASTPID=
FAILS=0

bg() { # bg LOGFILE CMD... : start in the background, remember the PID
  local logf=$1
  shift
  "$@" > "$logf" 2>&1 &
  LASTPID=$!
  PIDS+=("$LASTPID")
}

stop_pid() { # SIGTERM, then SIGKILL after 10 s; only PIDs this script started
  local p=$1 i
  kill -0 "$p" 2> /dev/null || { wait "$p" 2> /dev/null || true; return 0; }
  kill -TERM "$p" 2> /dev/null || true
  for ((i = 0; i < 200; i++)); do
    kill -0 "$p" 2> /dev/null || break
    sleep 0.05
  done
  kill -KILL "$p" 2> /dev/null || true
  wait "$p" 2> /dev/null || true
}

cleanup() {
  local p n
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2> /dev/null && kill -TERM "$p" 2> /dev/null || true
  done
  sleep 0.3
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2> /dev/null && kill -KILL "$p" 2> /dev/null || true
  done
  for n in $(ip netns list 2> /dev/null | awk '{print $1}' | grep "^$PREFIX" || true); do
    ip netns delete "$n" 2> /dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

m() { # run a measurement; a failure is counted, the suite goes on
  "$@" > /dev/null || { FAILS=$((FAILS + 1)); log "FAILED: ${*:1:14}"; }
}

# ------------------------------------------------------------------ topology
CASE=0
topo_up() {
  CASE=$((CASE + 1))
  local p="$PREFIX$CASE"
  CLI=$p-cli LB=$p-lb BE=$p-be
  local n
  for n in "$CLI" "$LB" "$BE"; do
    ip netns add "$n"
    ip -n "$n" link set lo up
  done
  ip link add c0 netns "$CLI" type veth peer name l0 netns "$LB"
  ip link add l1 netns "$LB" type veth peer name b0 netns "$BE"
  ip -n "$CLI" addr add 198.19.255.2/30 dev c0
  ip -n "$CLI" link set c0 up
  ip -n "$CLI" route add 198.18.0.0/15 via 198.19.255.1
  ip -n "$LB" addr add 198.19.255.1/30 dev l0
  ip -n "$LB" addr add 198.19.254.1/30 dev l1
  ip -n "$LB" link set l0 up
  ip -n "$LB" link set l1 up
  ip -n "$LB" route add 198.19.0.0/24 via 198.19.254.2
  ip -n "$BE" addr add 198.19.254.2/30 dev b0
  ip -n "$BE" link set b0 up
  ip -n "$BE" route add default via 198.19.254.1
  local j
  for ((j = 1; j <= M; j++)); do ip -n "$BE" addr add "198.19.0.$j/32" dev lo; done
  ip -n "$BE" addr add 198.19.0.240/32 dev lo # the backend the change test adds
  ip netns exec "$LB" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$CLI" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
  ip netns exec "$BE" sysctl -qw net.core.somaxconn=8192
  if [ "$(nproc)" -ge 2 ]; then
    # CPU0: prober and servers; CPU1: the load balancer's packet processing.
    ip netns exec "$LB" sh -c 'echo 2 > /sys/class/net/l0/queues/rx-0/rps_cpus; echo 2 > /sys/class/net/l1/queues/rx-0/rps_cpus'
    ip netns exec "$CLI" sh -c 'echo 1 > /sys/class/net/c0/queues/rx-0/rps_cpus'
    ip netns exec "$BE" sh -c 'echo 1 > /sys/class/net/b0/queues/rx-0/rps_cpus'
  fi
  bg "$OUT/logs/case$CASE-serve.log" taskset -c 0 ip netns exec "$BE" "$BENCH" serve --port 8080
  SERVE_PID=$LASTPID
  ip netns exec "$CLI" "$BENCH" wait-tcp --addr 198.19.0.1 --port 8080 --timeout-s 10 > /dev/null
}

topo_down() {
  stop_pid "$SERVE_PID"
  ip netns delete "$CLI" 2> /dev/null || true
  ip netns delete "$LB" 2> /dev/null || true
  ip netns delete "$BE" 2> /dev/null || true
}

# Waits (at most 30 s) for a second in which the machine is 90% idle. The kernel frees a
# deleted namespace's rules and connections in the background: after 100,000 farms that
# takes seconds of CPU, which would land in the next case's measurements.
settle() {
  local i k idle total a b
  for i in $(seq 30); do
    read -r -a a < /proc/stat
    sleep 1
    read -r -a b < /proc/stat
    idle=$((b[4] - a[4]))
    total=0
    for k in 1 2 3 4 5 6 7 8; do total=$((total + b[k] - a[k])); done
    if [ "$total" -gt 0 ] && [ $((idle * 100 / total)) -ge 90 ]; then return 0; fi
  done
  log "  the machine did not settle within 30 s"
}

scratch_ns() { # a throwaway namespace for `-e` applies
  CASE=$((CASE + 1))
  SCRATCH="$PREFIX$CASE-e"
  ip netns add "$SCRATCH"
  ip -n "$SCRATCH" link set lo up
}

# ------------------------------------------------------------------ measurements
# meta for records: sys, n, m (set per case)
rec() { echo --record "$J" --meta "sys=$SYS" --meta "n=$N" --meta "m=$MM" --meta "tier=$TIER" "$@"; }

vip_of() { "$BENCH" vip $(($1 - 1)); }

probe() { # probe VARIANT ADDR PORT [MIN-BACKENDS [ALSO]]: new-connection latency
  # ALSO (addr:port) is probed in alternation with ADDR:PORT, under the same conditions.
  local variant=$1 a=$2 p=$3 minb=${4:-0} also=()
  [ -n "${5:-}" ] && also=(--also "$5")
  ip netns exec "$LB" conntrack -F > /dev/null 2>&1 || true
  # shellcheck disable=SC2046
  m taskset -c 0 ip netns exec "$CLI" "$BENCH" $(rec --meta test=connect --meta "variant=$variant") \
    connect --addr "$a" --port "$p" --rate "$RATE" --count "$PROBES" --warmup "$WARMUP" \
    --timeout-ms 2000 --min-backends "$minb" "${also[@]}"
}

bulk() { # bulk ADDR PORT
  [ "$CHECK" = 1 ] && [ "$SYS" != floor-route ] && [ "$SYS" != nftlb-rs ] && return 0
  # shellcheck disable=SC2046
  m taskset -c 0 ip netns exec "$CLI" "$BENCH" $(rec --meta test=bulk) \
    bulk --addr "$1" --port "$2" --bytes "$BULK_BYTES" --streams 1 --timeout-s 60
}

path_ok() { # the last farm forwards to a backend
  # shellcheck disable=SC2046
  m ip netns exec "$CLI" "$BENCH" $(rec --meta test=path) wait-tcp --addr "$1" --port "$2" --timeout-s 20
}

farms_file() { # farms_file N M -> path (cached)
  local f="$TMP/farms-$1-$2.json"
  [ -s "$f" ] || "$BENCH" gen farms --n "$1" --m "$2" --out "$f"
  echo "$f"
}

KEY=benchkey-$$

wait_api() {
  ip netns exec "$LB" "$BENCH" wait-api --key "$KEY" --timeout-s "${1:-120}" > /dev/null
}

daemon_case() { # daemon_case ours|orig N M
  local which=$1 file bin
  N=$2 MM=$3
  file=$(farms_file "$N" "$MM")
  if [ "$which" = ours ]; then SYS=nftlb-rs bin=$NFTLB; else SYS=nftlb-orig bin=$ORIG; fi
  local tag="$SYS-$N-$MM" va vp
  log "$SYS: $N farms x $MM backends"

  # C1: cold apply with -e -c FILE (process start to exit), in a scratch namespace.
  scratch_ns
  # shellcheck disable=SC2046
  m ip netns exec "$SCRATCH" taskset -c 1 "$BENCH" $(rec --meta test=apply_exit) \
    exec --timeout-s 900 --log "$OUT/logs/$tag-exit.log" -- "$bin" -e -L 2 -l 3 -c "$file"
  if [ "$which" = orig ]; then
    # The original exits 0 even when it could not apply: count what it programmed.
    local maps
    maps=$(ip netns exec "$SCRATCH" nft list ruleset 2> /dev/null | grep -c 'dnat ip to' || true)
    "$BENCH" $(rec --meta test=note) record "text=nftlb-orig -e with $N farms: $maps dnat rules in the kernel afterwards" > /dev/null
  fi
  ip netns delete "$SCRATCH"

  # C1 through the API: one POST of the whole document into a fresh daemon.
  topo_up
  local state=$TMP/state-$CASE.json args=(-k "$KEY" -H 127.0.0.1 -P 5555 -L 2 -l 3)
  [ "$which" = ours ] && args+=(--state-file "$state")
  bg "$OUT/logs/$tag-daemon.log" taskset -c 1 ip netns exec "$LB" "$bin" "${args[@]}"
  local dpid=$LASTPID
  wait_api 60
  # shellcheck disable=SC2046
  if ! ip netns exec "$LB" "$BENCH" $(rec --meta test=apply_api) post --key "$KEY" --file "$file" \
    --timeout-s 900 > /dev/null; then
    FAILS=$((FAILS + 1))
    note "$SYS with $N farms: the API apply failed; the rest of this case was skipped"
    stop_pid "$dpid"
    topo_down
    return 0
  fi
  read -r va vp <<< "$(vip_of "$N")"
  path_ok "$va" "$vp"

  # C2: single changes (add a backend, down, up, remove it) on random farms.
  local count=$CHANGES
  [ "$which" = orig ] && count=$ORIG_CHANGES
  # shellcheck disable=SC2046
  m taskset -c 0 ip netns exec "$LB" "$BENCH" $(rec --meta test=changes) changes --key "$KEY" \
    --farms "$N" --count "$count" --ops add,down,up,remove --max-seconds "$CHANGE_SECONDS"

  # D4, D1 to the last farm.
  # The last farm, and in alternation a backend directly (through the same LB: routing
  # and conntrack, no NAT), so the two compare under the same conditions.
  probe "" "$va" "$vp" 2 198.19.0.1:8080
  bulk "$va" "$vp"
  "$BENCH" $(rec --meta test=rss) record "vmhwm_kb=$(awk '/VmHWM/{print $2}' /proc/$dpid/status)" > /dev/null
  # Listing every farm (after the RSS record above, which is the load's and the changes'
  # peak; this one is the listing's).
  # shellcheck disable=SC2046
  m ip netns exec "$LB" "$BENCH" $(rec --meta test=get_farms) post --key "$KEY" --method GET \
    --path /farms --timeout-s 600
  "$BENCH" $(rec --meta test=rss_get) record "vmhwm_kb=$(awk '/VmHWM/{print $2}' /proc/$dpid/status)" > /dev/null

  if [ "$which" = ours ] && [ "$MM" = 8 ] && [[ " $RESTART_AT " == *" $N "* ]]; then
    restart_test "$dpid" "$va" "$vp" "$state" "$tag"
    dpid=$RESTARTED
  fi
  if [ "$which" = ours ] && [ "$MM" = 8 ] && [[ " $BL_AT " == *" $N "* ]]; then
    blacklist_test "$va" "$vp"
  fi
  stop_pid "$dpid"
  topo_down
  [ "$N" -ge 10000 ] && settle
  return 0
}

RESTARTED=
restart_test() { # restart_test PID VIP PORT STATEFILE TAG
  local dpid=$1 va=$2 vp=$3 state=$4 tag=$5
  log "  restart with $N farms"
  local rate=200 window=$((6 + N / 4000))
  local pf=$TMP/restart-probe.json
  taskset -c 0 ip netns exec "$CLI" "$BENCH" connect --addr "$va" --port "$vp" --rate $rate \
    --count $((rate * window)) --timeout-ms 3000 > "$pf" 2> /dev/null &
  local ppid=$!
  PIDS+=("$ppid")
  sleep 1
  local t0 t1 t2
  t0=$(date +%s%N)
  stop_pid "$dpid"
  t1=$(date +%s%N)
  bg "$OUT/logs/$tag-daemon-restarted.log" taskset -c 1 ip netns exec "$LB" "$NFTLB" \
    -k "$KEY" -H 127.0.0.1 -P 5555 -L 2 -l 3 --state-file "$state"
  RESTARTED=$LASTPID
  wait_api 300 || true
  t2=$(date +%s%N)
  wait "$ppid" || true
  # The probes covered the restart if they ran until the API was back.
  local covered
  covered=$(echo "($t2 - $t0) / 1000000000 <= $window - 1" | bc -l)
  # shellcheck disable=SC2046
  m "$BENCH" $(rec --meta test=restart) record --merge "$pf" \
    "stop_s=$(echo "($t1 - $t0) / 1000000000" | bc -l)" \
    "start_s=$(echo "($t2 - $t1) / 1000000000" | bc -l)" "window_s=$window" "covered=$covered"
}

blacklist_test() { # blacklist_test VIP PORT
  local va=$1 vp=$2 bl=$TMP/blacklist.json
  log "  blacklist of $BL_ELEMENTS networks on farm f$((N - 1))"
  [ -s "$bl" ] || "$BENCH" gen blacklist --elements "$BL_ELEMENTS" --out "$bl"
  # shellcheck disable=SC2046
  m ip netns exec "$LB" "$BENCH" $(rec --meta test=bl_load --meta "elements=$BL_ELEMENTS") \
    post --key "$KEY" --path /policies --file "$bl" --timeout-s 900
  # shellcheck disable=SC2046
  m ip netns exec "$LB" "$BENCH" $(rec --meta test=bl_attach) post --key "$KEY" \
    --body "{\"farms\":[{\"name\":\"f$((N - 1))\",\"policies\":[{\"name\":\"bl\"}]}]}" --timeout-s 300
  # The farm with the blacklist, and in alternation the farm before it (no blacklist).
  local prev
  prev=$(vip_of $((N - 1)) | tr ' ' ':')
  probe bl "$va" "$vp" 2 "$prev"
  # One element more, then one less (192.0.2.0/24 is not in the generated list).
  local k
  for k in 1 2 3 4 5; do
    # shellcheck disable=SC2046
    m ip netns exec "$LB" "$BENCH" $(rec --meta test=bl_add --meta "variant=$k") post --key "$KEY" \
      --path /policies --body "{\"policies\":[{\"name\":\"bl\",\"elements\":[{\"data\":\"192.0.2.$k\"}]}]}" \
      --timeout-s 300
    # shellcheck disable=SC2046
    m ip netns exec "$LB" "$BENCH" $(rec --meta test=bl_del --meta "variant=$k") post --key "$KEY" \
      --method DELETE --path "/policies/bl/elements/192.0.2.$k" --timeout-s 300
  done
}

rules_case() { # rules_case kube-nft|ipt-legacy|ipt-nft N
  SYS=$1 N=$2 MM=$M
  log "$SYS: $N services x $MM endpoints"
  local file=$TMP/$SYS-$N.rules cmd kind
  case "$SYS" in
    kube-nft) "$BENCH" gen kube-nft --n "$N" --m "$MM" --out "$file"; cmd=(nft -f "$file") ;;
    ipt-legacy) "$BENCH" gen ipt --n "$N" --m "$MM" --out "$file"; cmd=(iptables-legacy-restore "$file") ;;
    ipt-nft) "$BENCH" gen ipt --n "$N" --m "$MM" --out "$file"; cmd=(iptables-nft-restore "$file") ;;
  esac
  topo_up
  # shellcheck disable=SC2046
  m ip netns exec "$LB" taskset -c 1 "$BENCH" $(rec --meta test=apply_exit) \
    exec --timeout-s 900 --log "$OUT/logs/$SYS-$N-apply.log" -- "${cmd[@]}"
  read -r va vp <<< "$(vip_of "$N")"
  path_ok "$va" "$vp"
  # shellcheck disable=SC2046
  m taskset -c 0 ip netns exec "$LB" "$BENCH" $(rec --meta test=changes) cli-changes --kind "$SYS" \
    --n "$N" --m "$MM" --count "$CLI_CHANGES" --max-seconds "$CHANGE_SECONDS" --dir "$TMP"
  probe "" "$va" "$vp" 2 198.19.0.1:8080
  bulk "$va" "$vp"
  rm -f "$file"
  topo_down
  [ "$N" -ge 10000 ] && settle
  return 0
}

haproxy_case() { # haproxy_case N
  SYS=haproxy N=$1 MM=$M
  log "haproxy: $N frontends x $MM servers"
  local cfg=$TMP/haproxy-$N.cfg
  "$BENCH" gen haproxy --n "$N" --m "$MM" --out "$cfg"
  topo_up
  ip -n "$LB" route add local 198.18.0.0/16 dev lo # the VIPs are local to the proxy
  bg "$OUT/logs/haproxy-$N.log" taskset -c 1 ip netns exec "$LB" haproxy -db -f "$cfg"
  local hp=$LASTPID
  read -r va vp <<< "$(vip_of "$N")"
  path_ok "$va" "$vp"
  probe "" "$va" "$vp" 2
  bulk "$va" "$vp"
  stop_pid "$hp"
  topo_down
}

floor_case() { # floor_case route|ct
  SYS=floor-$1 N=0 MM=0
  log "$SYS"
  topo_up
  local a=198.19.0.1 p=8080
  case "$1" in
    ct)
      ip netns exec "$LB" nft -f - << 'EOF'
table ip floor {
  chain pre { type filter hook prerouting priority 0; ct state new counter; }
}
EOF
      ;;
  esac
  path_ok "$a" "$p"
  probe "" "$a" "$p" 0
  bulk "$a" "$p"
  topo_down
}

# Flat layer 2 for direct server return: cli, lb and be on one bridge (in namespace sw).
#   cli 198.19.0.253  lb 198.19.0.254  be 198.19.0.1-8 (+ every VIP on lo, arp_ignore)
# The client routes the VIPs to lb; lb rewrites the destination MAC at netdev ingress and
# sends the frame back out; be answers the client directly.
flat_up() {
  CASE=$((CASE + 1))
  local p="$PREFIX$CASE" n ns
  CLI=$p-cli LB=$p-lb BE=$p-be SW=$p-sw
  for n in "$CLI" "$LB" "$BE" "$SW"; do
    ip netns add "$n"
    ip -n "$n" link set lo up
  done
  ip -n "$SW" link add br0 type bridge
  ip -n "$SW" link set br0 up
  for n in cli lb be; do
    ns=$CLI
    [ $n = lb ] && ns=$LB
    [ $n = be ] && ns=$BE
    ip link add eth0 netns "$ns" type veth peer name "$n" netns "$SW"
    ip -n "$SW" link set "$n" master br0 up
    ip -n "$ns" link set eth0 up
  done
  ip -n "$CLI" addr add 198.19.0.253/24 dev eth0
  ip -n "$CLI" route add 198.18.0.0/15 via 198.19.0.254
  ip -n "$LB" addr add 198.19.0.254/24 dev eth0
  local k j
  for k in all default eth0; do
    ip netns exec "$BE" sysctl -qw "net.ipv4.conf.$k.arp_ignore=1" "net.ipv4.conf.$k.arp_announce=2"
  done
  for ((j = 1; j <= M; j++)); do ip -n "$BE" addr add "198.19.0.$j/24" dev eth0; done
  ip -n "$BE" route add local 198.18.0.0/15 dev lo # every VIP is local to the backends
  ip netns exec "$CLI" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
  ip netns exec "$BE" sysctl -qw net.core.somaxconn=8192
  if [ "$(nproc)" -ge 2 ]; then
    ip netns exec "$LB" sh -c 'echo 2 > /sys/class/net/eth0/queues/rx-0/rps_cpus'
    ip netns exec "$CLI" sh -c 'echo 1 > /sys/class/net/eth0/queues/rx-0/rps_cpus'
    ip netns exec "$BE" sh -c 'echo 1 > /sys/class/net/eth0/queues/rx-0/rps_cpus'
  fi
  bg "$OUT/logs/case$CASE-serve.log" taskset -c 0 ip netns exec "$BE" "$BENCH" serve --port 8080 --port 80 --port 81
  SERVE_PID=$LASTPID
  ip netns exec "$CLI" "$BENCH" wait-tcp --addr 198.19.0.1 --port 8080 --timeout-s 10 > /dev/null
}

flat_down() {
  topo_down
  ip netns delete "$SW" 2> /dev/null || true
}

floor_netdev_case() {
  SYS=floor-netdev N=0 MM=0
  log "$SYS (flat L2)"
  flat_up
  local bmac lmac
  bmac=$(ip netns exec "$BE" cat /sys/class/net/eth0/address)
  lmac=$(ip netns exec "$LB" cat /sys/class/net/eth0/address)
  ip netns exec "$LB" nft -f - << EOF
table netdev floor {
  chain in { type filter hook ingress device "eth0" priority 0; ip daddr 198.18.0.1 ether saddr set $lmac ether daddr set $bmac fwd to "eth0"; }
}
EOF
  path_ok 198.18.0.1 80
  probe "" 198.18.0.1 80 0
  bulk 198.18.0.1 80
  flat_down
}

dsr_case() { # dsr_case N: ours in dsr mode, the same flat topology as the netdev floor
  SYS=nftlb-rs-dsr N=$1 MM=$M
  log "$SYS: $N farms x $MM backends (flat L2)"
  local file=$TMP/farms-dsr-$N.json
  "$BENCH" gen farms-dsr --n "$N" --m "$MM" --out "$file"
  flat_up
  bg "$OUT/logs/$SYS-$N-daemon.log" taskset -c 1 ip netns exec "$LB" "$NFTLB" -k "$KEY" -H 127.0.0.1 \
    -P 5555 -L 2 -l 3 --state-file "$TMP/state-$CASE.json"
  local dpid=$LASTPID va vp
  wait_api 60
  # shellcheck disable=SC2046
  if ! ip netns exec "$LB" "$BENCH" $(rec --meta test=apply_api) post --key "$KEY" --file "$file" \
    --timeout-s "$DSR_APPLY_TIMEOUT" > /dev/null; then
    FAILS=$((FAILS + 1))
    note "$SYS with $N farms: the API apply failed or took more than $DSR_APPLY_TIMEOUT s; the rest of this case was skipped"
    stop_pid "$dpid"
    flat_down
    return 0
  fi
  read -r va vp <<< "$(vip_of "$N")"
  path_ok "$va" "$vp"
  probe "" "$va" "$vp" 0
  bulk "$va" "$vp"
  stop_pid "$dpid"
  flat_down
}

# ------------------------------------------------------------------ run
GIT=${BENCH_GIT:-$(git rev-parse --short HEAD 2> /dev/null || echo "?")}
[ -n "$(git status --porcelain --untracked-files=no 2> /dev/null)" ] && GIT="$GIT+dirty"
SYS="" N=0 MM=0
"$BENCH" --record "$J" --meta test=info record "tier=$TIER" "date=$(date -u +%Y-%m-%dT%H:%MZ)" \
  "cores=$(nproc)" "kernel=$(uname -r)" "nft=$(nft --version | awk '{print $2}')" "git=$GIT" \
  "loadavg=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/')" > /dev/null
log "tier $TIER; results in $OUT"
T0=$(date +%s)

note() { "$BENCH" --record "$J" --meta test=note record "text=$*" > /dev/null; log "note: $*"; }
have() { command -v "$1" > /dev/null 2>&1; }

if want floors; then
  floor_case route
  floor_case ct
  floor_netdev_case
  note "floor-netdev and nftlb-rs-dsr run on a flat layer-2 topology (client, LB and backends on one bridge, replies straight from the backend to the client); the other systems on the routed one (cli - lb - be). The dsr farms' 8 backends share one namespace and so one MAC: the daemon sends everything to one of them (it says so in its answer), which does not change the per-packet work."
fi
if want ours; then
  for n in $OURS_N; do daemon_case ours "$n" "$M"; done
  # The same shape as the original can hold, for the side-by-side comparison.
  for n in $ORIG_N; do [ "$n" -gt 1 ] && daemon_case ours "$n" "$ORIG_M"; done
fi
if want dsr; then
  for n in $DSR_N; do dsr_case "$n"; done
fi
if want orig; then
  if [ -x "$ORIG" ]; then
    for n in $ORIG_N; do daemon_case orig "$n" "$ORIG_M"; done
  else
    note "nftlb (Debian package) not installed: the original was not measured"
  fi
fi
for s in kube-nft ipt-legacy ipt-nft; do
  want "$s" || continue
  case $s in
    kube-nft) tool=nft ;;
    ipt-legacy) tool=iptables-legacy-restore ;;
    ipt-nft) tool=iptables-nft-restore ;;
  esac
  if ! have "$tool"; then note "$tool not installed: $s not measured"; continue; fi
  for n in $CMP_N; do rules_case "$s" "$n"; done
done
if want haproxy; then
  if have haproxy; then
    for n in $HAPROXY_N; do haproxy_case "$n"; done
  else
    note "haproxy not installed: not measured"
  fi
fi

log "done in $(($(date +%s) - T0)) s"
if [ "$CHECK" = 1 ]; then
  bad=$(grep -c '"ok":false' "$J" || true)
  grep '"ok":false' "$J" >&2 || true
  leftover=$(ip netns list | grep -c "^$PREFIX" || true)
  echo "check-only: $(grep -c '"ok":true' "$J" || true) steps ok, $bad failed, $FAILS measurement errors"
  [ "$bad" = 0 ] && [ "$FAILS" = 0 ] || exit 1
  exit 0
fi
"$BENCH" report "$OUT"
[ "$FAILS" = 0 ] || log "$FAILS measurement(s) failed; see the Checks section"
