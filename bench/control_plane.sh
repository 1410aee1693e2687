#!/usr/bin/env bash
# Control-plane benchmark: ours against the original nftlb (Debian package), side by side
# in one run, each in its own throwaway network namespace.
#
#   bash bench/control_plane.sh [FARMS] [BACKENDS] [CHANGES]      (defaults 1000 2 200)
#   SKIP_ORIGINAL=1 bash bench/control_plane.sh 10000 8 100        (ours only: the original
#                                                                  cannot hold more than
#                                                                  4,095 backends)
#
# Measures, for FARMS dnat farms of BACKENDS backends each:
#   - cold apply with `-e -c FILE` (process start to exit),
#   - cold apply through the API (one POST of the whole document),
#   - CHANGES single-backend changes through the API (state down/up alternately on
#     random farms): curl's request time, p50 / p99 / max.
# Prints a Markdown table. Only namespaces named nlbbench-$$-* and processes it started
# (the processes inside those namespaces) are touched; everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

FARMS=${1:-1000}
BACKENDS=${2:-2}
CHANGES=${3:-200}
ORIG_CHANGES=$(( CHANGES < 50 ? CHANGES : 50 ))   # the original takes 40-80 ms each

bash scripts/install-deps.sh
if ! command -v nftlb >/dev/null 2>&1 || ! nftlb -h 2>&1 | grep -q -- '-m'; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftlb >/dev/null
fi
ORIG=/usr/sbin/nftlb
[ -x "$ORIG" ] || ORIG=$(command -v nftlb)
cargo build --release --quiet
OURS=$PWD/target/release/nftlb

TMP=$(mktemp -d)
PREFIX="nlbbench-$$-"
# Functions below run in command substitutions (subshells), so cleanup finds its
# namespaces by their prefix and its processes as the processes inside them.
cleanup() {
  local n p
  for n in $(ip netns list | awk '{print $1}' | grep "^$PREFIX" || true); do
    for p in $(ip netns pids "$n"); do kill "$p" 2>/dev/null || true; done
  done
  sleep 0.2
  for n in $(ip netns list | awk '{print $1}' | grep "^$PREFIX" || true); do
    ip netns delete "$n" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

mkns() {
  local n="$PREFIX$1"
  ip netns add "$n"
  ip -n "$n" link set lo up
  echo "$n"
}

# The document: FARMS dnat farms, VIP 198.18.x.y:80, backends in 198.19.0.0/16.
gen() {
  local f b sep=""
  printf '{"farms":['
  for ((f = 0; f < FARMS; f++)); do
    printf '%s{"name":"f%d","family":"ipv4","virtual-addr":"198.%d.%d.%d","virtual-ports":"80","protocol":"tcp","mode":"dnat","scheduler":"weight","state":"up","backends":[' \
      "$sep" "$f" $((18 + f / 64000)) $((f / 250 % 256)) $((f % 250 + 1))
    local bsep=""
    for ((b = 0; b < BACKENDS; b++)); do
      printf '%s{"name":"b%d","ip-addr":"198.19.%d.%d","weight":"1","state":"up"}' \
        "$bsep" "$b" $((b / 250)) $((b % 250 + 1))
      bsep=","
    done
    printf ']}'
    sep=","
  done
  printf ']}'
}
gen > "$TMP/farms.json"

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }

wait_api() { # ns key
  for _ in $(seq 200); do
    code=$(ip netns exec "$1" curl -s -o /dev/null -w '%{http_code}' -H "Key: $2" http://127.0.0.1:5555/farms || true)
    [ "$code" = 200 ] && return 0
    sleep 0.05
  done
  echo "API in $1 did not come up" >&2
  return 1
}

# cold apply with -e
exit_mode() { # binary label
  local ns t
  ns=$(mkns "e$2")
  t=$(now)
  if [ "$2" = ours ]; then
    ip netns exec "$ns" "$1" -e -L 2 -l 3 -c "$TMP/farms.json" >/dev/null
  else
    ip netns exec "$ns" "$1" -e -L 2 -l 3 -c "$TMP/farms.json" >/dev/null 2>&1
  fi
  elapsed "$t"
}

percentiles() { # file -> "p50 p99 max" in ms
  sort -g "$1" | awk '{a[NR]=$1} END {p50=a[int((NR-1)*0.5)+1]; p99=a[int((NR-1)*0.99)+1]; printf "%.2f %.2f %.2f", p50*1000, p99*1000, a[NR]*1000}'
}

api_run() { # binary label changes
  local ns key=benchkey pid t
  ns=$(mkns "a$2")
  if [ "$2" = ours ]; then
    ip netns exec "$ns" "$1" -k "$key" -L 2 -l 3 --state-file "$TMP/$2-state.json" >/dev/null 2>&1 &
  else
    ip netns exec "$ns" "$1" -k "$key" -H 127.0.0.1 -P 5555 -L 2 -l 3 >/dev/null 2>&1 &
  fi
  pid=$!
  wait_api "$ns" "$key"
  t=$(now)
  ip netns exec "$ns" curl -s -o /dev/null -H "Key: $key" --data-binary "@$TMP/farms.json" http://127.0.0.1:5555/farms
  local cold
  cold=$(elapsed "$t")
  : > "$TMP/$2-changes"
  local i f state
  for ((i = 0; i < $3; i++)); do
    f=$(( (i * 7919) % FARMS ))
    state=$([ $((i / FARMS % 2)) = 0 ] && echo down || echo up)
    ip netns exec "$ns" curl -s -o /dev/null -w '%{time_total}\n' -H "Key: $key" \
      --data-binary "{\"farms\":[{\"name\":\"f$f\",\"backends\":[{\"name\":\"b0\",\"state\":\"$state\"}]}]}" \
      http://127.0.0.1:5555/farms >> "$TMP/$2-changes"
  done
  local rules
  rules=$(ip netns exec "$ns" nft list ruleset | wc -l)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$cold $(percentiles "$TMP/$2-changes") $rules"
}

echo "machine: $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >&2
echo "farms=$FARMS backends=$BACKENDS changes=$CHANGES (original: $ORIG_CHANGES)" >&2
ours_e=$(exit_mode "$OURS" ours)
if [ -n "${SKIP_ORIGINAL:-}" ]; then orig_e=nan; else orig_e=$(exit_mode "$ORIG" orig); fi
read -r ours_cold ours_p50 ours_p99 ours_max ours_lines <<<"$(api_run "$OURS" ours "$CHANGES")"
if [ -n "${SKIP_ORIGINAL:-}" ]; then
  read -r orig_cold orig_p50 orig_p99 orig_max orig_lines <<<"nan - - - -"
else
  read -r orig_cold orig_p50 orig_p99 orig_max orig_lines <<<"$(api_run "$ORIG" orig "$ORIG_CHANGES")"
fi

printf '\n| %s farms x %s backends (dnat) | nftlb-rs | nftlb 1.0.7 (Debian) |\n|---|---|---|\n' "$FARMS" "$BACKENDS"
printf '| cold apply, `-e -c FILE` | %.3f s | %.3f s |\n' "$ours_e" "$orig_e"
printf '| cold apply, one API POST | %.3f s | %.3f s |\n' "$ours_cold" "$orig_cold"
printf '| one backend change via API, p50 / p99 / max | %s / %s / %s ms (n=%s) | %s / %s / %s ms (n=%s) |\n' \
  "$ours_p50" "$ours_p99" "$ours_max" "$CHANGES" "$orig_p50" "$orig_p99" "$orig_max" "$ORIG_CHANGES"
printf '| lines of `nft list ruleset` afterwards | %s | %s |\n' "$ours_lines" "$orig_lines"
