#!/usr/bin/env bash
# Power cycles through Redfish BMCs under the hardware bundle's per-BMC
# limit, at 1 (its default) and at 4:
#
#   bash tests/bench/power-limits.sh [BMCS] [SERVERS_PER_BMC] [CYCLES] [ROUNDS]
#
# BMCS (default 25) sushy-tools emulators (fake driver, plain HTTP on
# loopback; TROUPE_TEST_SUSHY names sushy-emulator, as `tests/run` sets it)
# with SERVERS_PER_BMC (default 4) servers each: 100 servers. One `troupe
# serve` (target/release, SQLite) with the hardware bundle; CYCLES (default
# 10) `power op=cycle` actions per server (1,000) submitted at once, round
# robin over the servers, for each limit in turn, ROUNDS (default 1) times.
# The emulator carries out a reset 1 to 11 s after it is asked (its fake
# driver, random), so the time is mostly the BMCs'; what is troupe's is the
# CPU its server and step host used per action. Prints per run: actions per
# second (the 1,000 over the time from the first submit to the last end),
# CPU ms per action of the server and of its step host (the step's own
# work: the Redfish calls and the polls of the power state), the longest any action waited from its submit to its
# power step's start, and how long after the first submit the last one
# started. Bounded: every action has the step's own timeout; the wait for
# all to end gives up after 30 minutes.
set -euo pipefail
bmcs=${1:-25}; per=${2:-4}; cycles=${3:-10}; rounds=${4:-1}
bin=$(realpath "${TROUPE_BIN:-target/release/troupe}")
lib=$(realpath "${TROUPE_HARDWARE_LIB:-target/release/libhardware.so}")
emulator=${TROUPE_TEST_SUSHY:?TROUPE_TEST_SUSHY names sushy-emulator: run tests/run once, or source its environment}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 0.5; rm -rf "$work"' EXIT
tick=$(getconf CLK_TCK)
port0=18900

# The emulators, each on its own port with servers b<B>-s<S>.
list=""
for b in $(seq 0 $((bmcs - 1))); do
  mkdir -p "$work/bmc$b"
  systems=""
  for s in $(seq 0 $((per - 1))); do
    systems+="{'uuid': 'b$b-s$s', 'name': 'b$b-s$s', 'power_state': 'On', 'nics': []}, "
  done
  echo "SUSHY_EMULATOR_FAKE_SYSTEMS = [${systems}]" >"$work/bmc$b/emulator.conf"
  SUSHY_EMULATOR_CONFIG="$work/bmc$b/emulator.conf" TMPDIR="$work/bmc$b" \
    "$emulator" --fake --interface 127.0.0.1 --port $((port0 + b)) >"$work/bmc$b/log" 2>&1 &
  list+="http://127.0.0.1:$((port0 + b)),"
done
for b in $(seq 0 $((bmcs - 1))); do
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$((port0 + b))/redfish/v1/" >/dev/null && break; sleep 0.1; done
done

$bin keys generate --out "$work/k" >"$work/pub"
$bin bundle build steps/hardware/bundle.toml --library "$lib" --out "$work/h.bundle" >/dev/null
$bin bundle sign "$work/h.bundle" --key "$work/k" >/dev/null

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hosts_of() { # its step hosts' CPU ticks
  local t=0 p
  for p in $(pgrep -P "$1" || true); do t=$((t + $(ticks "$p"))); done
  echo "$t"
}

run() { # LIMIT ROUND
  local limit=$1 dir="$work/s-$1-$2" url="http://127.0.0.1:18899"
  mkdir -p "$dir"
  $bin serve --data-dir "$dir" --listen 127.0.0.1:18899 --trust "$(cat "$work/pub")" --bundle "$work/h.bundle" \
    --var "bmcs=$list" --var bmc_trust= --limit "bmc=$limit" >"$dir/log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do curl -sf "$url/v1/health/live" >/dev/null && break; sleep 0.1; done
  local auth="Authorization: Bearer $(cat "$dir/admin.token")"
  curl -sf -X PUT -H "$auth" -H 'content-type: application/json' -d '{"value":"admin:password"}' \
    "$url/v1/secrets/bmc_credentials" >/dev/null
  submit() { # TARGET BMC SYSTEM
    curl -s -X POST -H "$auth" -H 'content-type: application/json' \
      -d "{\"kind\":\"power\",\"target\":\"$1\",\"params\":{\"op\":\"cycle\",\"bmc\":\"$2\",\"system\":\"$3\"}}" \
      "$url/v1/actions" >/dev/null
  }
  # Warm the step host and the connections: one status read per BMC.
  for b in $(seq 0 $((bmcs - 1))); do
    curl -s -X POST -H "$auth" -H 'content-type: application/json' \
      -d "{\"kind\":\"power\",\"target\":\"warm-$b\",\"params\":{\"op\":\"status\",\"bmc\":\"http://127.0.0.1:$((port0 + b))\",\"system\":\"b$b-s0\"}}" \
      "$url/v1/actions?wait=30s" >"$dir/warm.json"
    grep -q '"succeeded"' "$dir/warm.json" || { echo "warming failed:" >&2; cat "$dir/warm.json" >&2; exit 1; }
  done
  local warm; warm=$(sqlite3 "$dir/troupe.db" "SELECT MAX(id) FROM actions")
  local cpu0 host0; cpu0=$(ticks "$pid"); host0=$(hosts_of "$pid")
  for c in $(seq 1 "$cycles"); do
    for b in $(seq 0 $((bmcs - 1))); do
      for s in $(seq 0 $((per - 1))); do
        submit "b$b-s$s" "http://127.0.0.1:$((port0 + b))" "b$b-s$s"
      done
    done
  done
  local deadline=$((SECONDS + 1800))
  while [ "$(sqlite3 "$dir/troupe.db" "SELECT COUNT(*) FROM actions WHERE status IN ('queued','running')")" != 0 ]; do
    if [ $SECONDS -gt $deadline ]; then echo "gave up waiting" >&2; break; fi
    sleep 1
  done
  local cpu1 host1; cpu1=$(ticks "$pid"); host1=$(hosts_of "$pid")
  local n=$((bmcs * per * cycles))
  # Times are RFC 3339 text: julianday() reads them.
  sqlite3 -separator ' ' "$dir/troupe.db" "
    SELECT
      SUM(a.status = 'succeeded'), SUM(a.status <> 'succeeded'),
      (julianday(MAX(a.finished_at)) - julianday(MIN(a.created_at))) * 86400,
      MAX((julianday(s.started_at) - julianday(a.created_at)) * 86400),
      (julianday(MAX(s.started_at)) - julianday(MIN(a.created_at))) * 86400
    FROM actions a JOIN action_steps s ON s.action_id = a.id AND s.seq = 0
    WHERE a.id > $warm" >"$dir/stats"
  read -r ok bad span longest last <"$dir/stats"
  printf 'limit %d, round %d: %d succeeded, %d not; %.1f actions/s (%.0f s); CPU per action: server %.2f ms, step host %.2f ms; longest wait %.0f s, last start %.0f s after the first submit\n' \
    "$limit" "$2" "$ok" "$bad" "$(echo "$n / $span" | bc -l)" "$span" \
    "$(echo "($cpu1 - $cpu0) * 1000 / $tick / $n" | bc -l)" "$(echo "($host1 - $host0) * 1000 / $tick / $n" | bc -l)" \
    "$longest" "$last"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$rounds"); do
  for limit in 1 4; do run "$limit" "$round"; done
done
