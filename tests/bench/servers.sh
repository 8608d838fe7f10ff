#!/usr/bin/env bash
# Throughput of 1, 2 and 3 servers on one MySQL/MariaDB.
#
#   bash tests/bench/servers.sh MYSQL_URL [ACTIONS] [CONCURRENCY] [ROUNDS]
#
# MYSQL_URL names a server and a user that may create databases, e.g.
# mysql://root:pw@127.0.0.1:3306 (databases troupe_servers_N are made anew).
# For N = 1, 2, 3: N `troupe serve` (target/release) on a fresh database;
# N `troupe bench --server` clients, one per server, run at once, each
# submitting ACTIONS/N `noop3` actions with CONCURRENCY/N in flight (a load
# balancer's even spread). Prints, per round, the actions per second of all
# clients together (ACTIONS over the slowest client's time) and the CPU
# seconds the database's process used per 1,000 actions. Loopback only.
set -euo pipefail
url=${1:?MYSQL_URL}; total=${2:-6000}; conc=${3:-64}; rounds=${4:-3}
bin=target/release/troupe
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
hostport=${url#*@}; host=${hostport%:*}; port=${hostport##*:}; creds=${url#mysql://}; creds=${creds%@*}
user=${creds%%:*}; pass=${creds#*:}
sql() { mariadb --no-defaults -h"$host" -P"$port" -u"$user" -p"$pass" -N -B -e "$1"; }
dbpid=$(pgrep -o -x mariadbd || pgrep -o -x mysqld)
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tick=$(getconf CLK_TCK)
$bin keys generate --out "$work/k" > "$work/pub"
$bin bundle build steps/testkit/bundle.toml --library target/release/libtestkit.so --out "$work/t.bundle" >/dev/null
$bin bundle sign "$work/t.bundle" --key "$work/k" >/dev/null
for round in $(seq 1 "$rounds"); do
  for n in 1 2 3; do
    db="troupe_servers_$n"
    sql "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
    rm -rf "$work/s"*; pids=()
    # The first start makes the schema, the admin token and the secrets key.
    for i in $(seq 1 "$n"); do
      mkdir -p "$work/s$i"
      if [ "$i" -gt 1 ]; then cp "$work/s1/admin.token" "$work/s1/secrets.key" "$work/s$i/"; fi
      $bin serve --data-dir "$work/s$i" --db "$url/$db" --listen "127.0.0.1:$((18700 + i))" --server-id "s$i" \
        --trust "$(cat "$work/pub")" --bundle "$work/t.bundle" >"$work/s$i.log" 2>&1 &
      pids+=($!)
      for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$((18700 + i))/v1/health/live" >/dev/null && break; sleep 0.1; done
    done
    export TROUPE_TOKEN; TROUPE_TOKEN=$(cat "$work/s1/admin.token")
    # Warm every server (step hosts, connections) before measuring.
    for i in $(seq 1 "$n"); do
      $bin bench --server "http://127.0.0.1:$((18700 + i))" -n 500 -c 16 --light 0 --json >/dev/null
    done
    db0=$(cpu_of "$dbpid"); t0=$(date +%s.%N); clients=()
    for i in $(seq 1 "$n"); do
      $bin bench --server "http://127.0.0.1:$((18700 + i))" -n $((total / n)) -c $((conc / n)) --light 0 --json \
        >"$work/c$i.json" &
      clients+=($!)
    done
    for c in "${clients[@]}"; do wait "$c"; done
    t1=$(date +%s.%N); db1=$(cpu_of "$dbpid")
    rate=$(echo "$total / ($t1 - $t0)" | bc -l)
    dbcpu=$(echo "($db1 - $db0) / $tick / $total * 1000" | bc -l)
    printf 'round %d: %d server(s): %.0f actions/s, database %.2f CPU s per 1,000 actions\n' "$round" "$n" "$rate" "$dbcpu"
    for p in "${pids[@]}"; do kill "$p"; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  done
done
