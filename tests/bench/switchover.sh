#!/usr/bin/env bash
# How long submits stall when a MariaDB primary/replica pair is switched over.
#
#   bash tests/bench/switchover.sh PAIR_DIR [ROUNDS]
#
# PAIR_DIR is a pair tests/replica/start.sh made (and runs). One `troupe
# serve` (TROUPE_BIN, default target/release/troupe) is given both servers
# in --db; three clients submit back to back (curl, 20 s timeout, each
# submit with an idempotency key). Each round switches the pair over
# (tests/replica/switchover.sh, each round the other way) and measures, from
# the moment the switchover began, the longest time no submit was
# acknowledged, and counts the submits not acknowledged. Prints one line
# per round and the p50/p99. Loopback only; bounded by ROUNDS (default 10).
set -euo pipefail
pdir=$(cd "${1:?PAIR_DIR}" && pwd); rounds=${2:-10}
bin=${TROUPE_BIN:-target/release/troupe}
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=/dev/null
source "$pdir/env"
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
primary=1
if [[ "$(mariadb --no-defaults -uroot --socket="$pdir/s1.sock" -N -B -e 'SELECT @@read_only')" == 1 ]]; then primary=2; fi
mariadb --no-defaults -uroot --socket="$pdir/s$primary.sock" -e "DROP DATABASE IF EXISTS troupe_switchover; CREATE DATABASE troupe_switchover"
db="mysql://troupe_test:troupe-test@$TROUPE_TEST_REPLICA/troupe_switchover"
$bin keys generate --out "$work/k" > "$work/pub"
$bin bundle build steps/testkit/bundle.toml --library "$(dirname "$bin")/libtestkit.so" --out "$work/t.bundle" >/dev/null
$bin bundle sign "$work/t.bundle" --key "$work/k" >/dev/null
$bin serve --data-dir "$work/s" --db "$db" --listen 127.0.0.1:18702 --trust "$(cat "$work/pub")" \
  --bundle "$work/t.bundle" >"$work/s.log" 2>&1 &
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18702/v1/health/live >/dev/null && break; sleep 0.1; done
token=$(cat "$work/s/admin.token")
now() { date +%s.%N; }
client() { # out-file key-prefix
  local n=0
  while [ ! -e "$work/stop" ]; do
    local t0 code; t0=$(now); n=$((n + 1))
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 20 -H "Authorization: Bearer $token" \
      -H 'content-type: application/json' \
      -d '{"kind":"noop3","target":"vps-'"$RANDOM"'","params":{},"idempotency_key":"'"$2-$n"'"}' \
      http://127.0.0.1:18702/v1/actions || true)
    echo "$t0 $(now) $code" >> "$1"
  done
}
stalls=()
for round in $(seq 1 "$rounds"); do
  rm -f "$work/stop" "$work"/c*.txt
  pids=()
  for c in 1 2 3; do client "$work/c$c.txt" "r$round-c$c" & pids+=($!); done
  sleep 2
  began=$(now)
  to=$(bash "$here/replica/switchover.sh" "$pdir")
  sleep 3
  touch "$work/stop"; wait "${pids[@]}" 2>/dev/null || true
  stall=$(cat "$work"/c*.txt | awk -v b="$began" '$3 == 202 && $2 > b { print $2 }' | sort -n |
    awk -v b="$began" 'BEGIN { last = b } { if ($1 - last > m) m = $1 - last; last = $1 } END { printf "%.3f", m }')
  refused=$(cat "$work"/c*.txt | awk '$3 != 202' | wc -l)
  total=$(cat "$work"/c*.txt | wc -l)
  echo "round $round: to server $to; the longest time without an acknowledged submit $stall s; $refused of $total submits not acknowledged"
  stalls+=("$stall")
done
printf '%s\n' "${stalls[@]}" | sort -n | awk '{ a[NR] = $1 } END {
  p50 = a[int((NR + 1) / 2)]; i = int(NR * 0.99 + 0.999); if (i > NR) i = NR
  printf "stall p50 %.3f s, p99 %.3f s over %d switchovers\n", p50, a[i], NR }'
