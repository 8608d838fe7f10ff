#!/usr/bin/env bash
# How long submits stall when the Galera node troupe writes through dies.
#
#   bash tests/bench/galera-failover.sh GALERA_DIR [KILLS]
#
# GALERA_DIR is a cluster tests/galera/start.sh made (and runs). One
# `troupe serve` (TROUPE_BIN, default target/release/troupe) is given the
# three nodes in --db; four clients submit back to back (curl, 20 s
# timeout). Each round SIGKILLs the node written through (node 1), times
# from the kill to the first acknowledged submit sent after it, counts the
# refused ones, then starts the node again and waits until the writes are
# back on it. Prints one line per round and the p50/p99. Loopback only;
# bounded by KILLS (default 5).
set -euo pipefail
gdir=$(cd "${1:?GALERA_DIR}" && pwd); kills=${2:-5}
bin=${TROUPE_BIN:-target/release/troupe}
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=/dev/null
source "$gdir/env"
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mariadb --no-defaults -uroot --socket="$gdir/n1.sock" -e "DROP DATABASE IF EXISTS troupe_failover; CREATE DATABASE troupe_failover"
db="mysql://troupe_test:troupe-test@$TROUPE_TEST_GALERA/troupe_failover"
first=${TROUPE_TEST_GALERA%%,*}
$bin keys generate --out "$work/k" > "$work/pub"
$bin bundle build steps/testkit/bundle.toml --library "$(dirname "$bin")/libtestkit.so" --out "$work/t.bundle" >/dev/null
$bin bundle sign "$work/t.bundle" --key "$work/k" >/dev/null
$bin serve --data-dir "$work/s" --db "$db" --listen 127.0.0.1:18701 --trust "$(cat "$work/pub")" \
  --bundle "$work/t.bundle" >"$work/s.log" 2>&1 &
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18701/v1/health/live >/dev/null && break; sleep 0.1; done
token=$(cat "$work/s/admin.token")
through() { curl -s -H "Authorization: Bearer $token" http://127.0.0.1:18701/v1/health | sed -n 's/.*"writes_through":"\([^"]*\)".*/\1/p'; }
now() { date +%s.%N; }
client() { # out-file
  while [ ! -e "$work/stop" ]; do
    local t0 code; t0=$(now)
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 20 -H "Authorization: Bearer $token" \
      -H 'content-type: application/json' -d '{"kind":"noop3","target":"vps-'"$RANDOM"'","params":{}}' \
      http://127.0.0.1:18701/v1/actions || true)
    echo "$t0 $(now) $code" >> "$1"
  done
}
stalls=()
for round in $(seq 1 "$kills"); do
  rm -f "$work/stop" "$work"/c*.txt
  pids=()
  for c in 1 2 3 4; do client "$work/c$c.txt" & pids+=($!); done
  sleep 3
  killed=$(now)
  bash "$here/galera/node.sh" "$gdir" kill 1
  sleep 12
  touch "$work/stop"; wait "${pids[@]}" 2>/dev/null || true
  stall=$(cat "$work"/c*.txt | awk -v k="$killed" '$1 > k && $3 == 202 { d = $2 - k; if (m == "" || d < m) m = d } END { printf "%.2f", m }')
  refused=$(cat "$work"/c*.txt | awk '$3 != 202' | wc -l)
  total=$(cat "$work"/c*.txt | wc -l)
  echo "round $round: first acknowledged submit $stall s after the kill; $refused of $total submits refused; now through $(through)"
  stalls+=("$stall")
  bash "$here/galera/node.sh" "$gdir" start 1
  for _ in $(seq 1 300); do [ "$(through)" = "$first" ] && break; sleep 0.1; done
done
printf '%s\n' "${stalls[@]}" | sort -n | awk '{ a[NR] = $1 } END {
  p50 = a[int((NR + 1) / 2)]; i = int(NR * 0.99 + 0.999); if (i > NR) i = NR
  printf "stall p50 %.2f s, p99 %.2f s over %d kills\n", p50, a[i], NR }'
