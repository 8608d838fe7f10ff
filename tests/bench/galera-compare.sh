#!/usr/bin/env bash
# troupe on a Galera cluster against a plain MariaDB started with the same
# flags, in one run:
#
#   bash tests/bench/galera-compare.sh GALERA_DIR [ROUNDS]
#
# GALERA_DIR is a cluster tests/galera/start.sh made (and runs). A plain
# MariaDB (no wsrep, otherwise node.sh's flags) is started on loopback for
# the run and removed after. Then, alternately, ROUNDS (default 3) times
# each: `troupe bench -n 2000 -c 32 --light 200` (TROUPE_BIN, default
# target/release/troupe) on a fresh database on each, the Galera one given
# all three nodes (it writes through node 1, with causal reads as troupe
# always asks). Last, on each, the stall a 64 MiB bundle push makes: one
# client submits back to back for 8 s, the bundle (the testkit library
# padded with random bytes to 64 MiB) is pushed, and the client goes on for
# 8 s more; prints the push's time and the submits' p50 before and their
# slowest while it was under way. Loopback only; bounded by ROUNDS and the
# bench's own -n and --timeout.
set -euo pipefail
gdir=$(cd "${1:?GALERA_DIR}" && pwd); rounds=${2:-3}
bin=$(realpath "${TROUPE_BIN:-target/release/troupe}")
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=/dev/null
source "$gdir/env"
work=$(mktemp -d)
plain_port=34590
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  if [[ -f "$work/plain.pid" ]]; then kill "$(cat "$work/plain.pid")" 2>/dev/null || true; sleep 1; fi
  rm -rf "$work"
}
trap cleanup EXIT

user_args=()
if [[ $(id -u) -eq 0 ]]; then user_args=(--user=root); fi
mariadb-install-db --no-defaults --datadir="$work/plain" "${user_args[@]}" --auth-root-authentication-method=normal \
  --skip-test-db >"$work/install.log" 2>&1
setsid mariadbd --no-defaults "${user_args[@]}" --datadir="$work/plain" --socket="$work/plain.sock" \
  --pid-file="$work/plain.pid" --port=$plain_port --bind-address=127.0.0.1 --skip-name-resolve \
  --log-error="$work/plain.err" --innodb-buffer-pool-size=32M --performance-schema=OFF --max-connections=300 \
  --max-allowed-packet=128M --binlog-format=ROW --innodb-autoinc-lock-mode=2 </dev/null >/dev/null 2>&1 &
for _ in $(seq 1 100); do
  mariadb --no-defaults -uroot --socket="$work/plain.sock" -e 'SELECT 1' >/dev/null 2>&1 && break
  sleep 0.2
done
mariadb --no-defaults -uroot --socket="$work/plain.sock" <<SQL
CREATE USER 'troupe_test'@'127.0.0.1' IDENTIFIED BY 'troupe-test';
GRANT ALL PRIVILEGES ON *.* TO 'troupe_test'@'127.0.0.1';
SQL

# A fresh database on each: prints its URL.
fresh() { # plain|galera NAME
  if [[ $1 == plain ]]; then
    mariadb --no-defaults -uroot --socket="$work/plain.sock" -e "CREATE DATABASE $2"
    echo "mysql://troupe_test:troupe-test@127.0.0.1:$plain_port/$2"
  else
    mariadb --no-defaults -uroot --socket="$gdir/n1.sock" -e "DROP DATABASE IF EXISTS $2; CREATE DATABASE $2"
    echo "mysql://troupe_test:troupe-test@$TROUPE_TEST_GALERA/$2"
  fi
}

echo "round db actions/s c1_p50_ms c1_p99_ms"
for r in $(seq 1 "$rounds"); do
  for db in plain galera; do
    url=$(fresh $db "troupe_cmp_${r}")
    "$bin" bench -n 2000 -c 32 --light 200 --db "$url" --json >"$work/b.json" 2>"$work/b.err" ||
      { echo "bench on $db failed:"; tail -5 "$work/b.err"; exit 1; }
    python3 - "$r" "$db" "$work/b.json" <<'PY'
import json, sys
r, db, path = sys.argv[1:]
b = json.load(open(path))
light = b["light_latency"]
print(r, db, round(b["throughput_per_s"]), round(light["p50_ms"], 2), round(light["p99_ms"], 2),
      "" if b["failed"] == b["missing"] == 0 else f"({b['failed']} failed, {b['missing']} missing)")
PY
  done
done

# The bundle push's stall.
# The server starts with the testkit bundle; the big one is its next
# version, the library padded (an ELF loader ignores what follows it).
"$bin" keys generate --out "$work/k" >"$work/pub" 2>/dev/null
lib=$(dirname "$bin")/libtestkit.so
"$bin" bundle build "$here/../steps/testkit/bundle.toml" --library "$lib" --out "$work/small.bundle" >/dev/null
"$bin" bundle sign "$work/small.bundle" --key "$work/k" >/dev/null
cp "$lib" "$work/libtestkit.so"
pad=$(( (64 << 20) - $(stat -c %s "$lib") - (1 << 20) ))
head -c "$pad" /dev/urandom >>"$work/libtestkit.so"
sed 's/^version = .*/version = "99.0.0"/' "$here/../steps/testkit/bundle.toml" >"$work/big.toml"
"$bin" bundle build "$work/big.toml" --library "$work/libtestkit.so" --out "$work/big.bundle" >/dev/null
"$bin" bundle sign "$work/big.bundle" --key "$work/k" >/dev/null
echo "bundle of $(stat -c %s "$work/big.bundle") bytes"
now() { date +%s.%N; }
echo "db push_s submit_p50_before_ms slowest_submit_during_push_ms"
for db in plain galera; do
  url=$(fresh $db troupe_cmp_push)
  rm -rf "$work/s" "$work/times"
  "$bin" serve --data-dir "$work/s" --db "$url" --listen 127.0.0.1:18702 --trust "$(cat "$work/pub")" \
    --bundle "$work/small.bundle" >"$work/s.log" 2>&1 &
  spid=$!
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18702/v1/health/live >/dev/null && break; sleep 0.1; done
  token=$(cat "$work/s/admin.token")
  ( end=$(( $(date +%s) + 17 ))
    while (( $(date +%s) < end )); do
      t0=$(now)
      code=$(curl -s -o /dev/null -w '%{http_code}' -m 30 -H "Authorization: Bearer $token" \
        -H 'content-type: application/json' -d '{"kind":"noop3","target":"vps-1","params":{}}' \
        http://127.0.0.1:18702/v1/actions || true)
      echo "$t0 $(now) $code" >>"$work/times"
    done ) &
  cpid=$!
  sleep 8
  p0=$(now)
  TROUPE_SERVER=http://127.0.0.1:18702 TROUPE_TOKEN=$token "$bin" bundle push "$work/big.bundle" >"$work/push.out" 2>&1 ||
    { echo "push on $db failed:"; cat "$work/push.out"; exit 1; }
  p1=$(now)
  wait "$cpid"
  kill "$spid"; wait "$spid" 2>/dev/null || true
  awk -v p0="$p0" -v p1="$p1" -v db="$db" '
    $3 != 202 { bad++ }
    $2 < p0 { before[++n] = ($2 - $1) * 1000 }
    $2 >= p0 && $1 <= p1 { d = ($2 - $1) * 1000; if (d > slow) slow = d }
    END {
      asort(before); printf "%s %.2f %.1f %.0f%s\n", db, p1 - p0, before[int((n + 1) / 2)], slow,
        (bad ? " (" bad " submits not 202)" : "") }' "$work/times"
done
