#!/usr/bin/env bash
# How long a SIGKILLed server's actions take to resume on the others.
#
#   bash tests/bench/takeover.sh MYSQL_URL [KILLS] [ACTIONS]
#
# MYSQL_URL names a server and a user that may create databases, e.g.
# mysql://root:pw@127.0.0.1:3306 (a database troupe_takeover is made anew).
# Three `troupe serve` (target/release, default --lease 6s) share it; each
# round submits ACTIONS 3 s sleeps through one server, SIGKILLs it once
# they run, and times, from the kill, when the first and the last of them
# is owned by another server again; then starts it again. Prints one line
# per round and the p50/p99 of each. Loopback only; bounded by KILLS.
set -euo pipefail
url=${1:?MYSQL_URL}; kills=${2:-10}; actions=${3:-20}
bin=target/release/troupe
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
hostport=${url#*@}; host=${hostport%:*}; port=${hostport##*:}; creds=${url#mysql://}; creds=${creds%@*}
user=${creds%%:*}; pass=${creds#*:}
sql() { mariadb --no-defaults -h"$host" -P"$port" -u"$user" -p"$pass" -N -B -e "$1"; }
sql "DROP DATABASE IF EXISTS troupe_takeover; CREATE DATABASE troupe_takeover"
db="$url/troupe_takeover"
$bin keys generate --out "$work/k" > "$work/pub"
$bin bundle build steps/testkit/bundle.toml --library target/release/libtestkit.so --out "$work/t.bundle" >/dev/null
$bin bundle sign "$work/t.bundle" --key "$work/k" >/dev/null
# A first start makes the schema, the admin token and the secrets key.
$bin serve --data-dir "$work/s0" --db "$db" --listen 127.0.0.1:0 --server-id s0 >"$work/s0.log" 2>&1 &
s0=$!
until [ -s "$work/s0/admin.token" ]; do sleep 0.1; done
kill "$s0"; wait "$s0" 2>/dev/null || true
key="$work/s0/secrets.key"
start() { # id port
  mkdir -p "$work/$1"; cp "$work/s0/admin.token" "$work/$1/" 2>/dev/null || true
  $bin serve --data-dir "$work/$1" --db "$db" --listen "127.0.0.1:$2" --server-id "$1" \
    --secrets-key "$key" --trust "$(cat "$work/pub")" --bundle "$work/t.bundle" >"$work/$1.log" 2>&1 &
  echo $! > "$work/$1.pid"
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$2/v1/health/live" >/dev/null && return; sleep 0.1; done
  echo "server $1 did not start" >&2; cat "$work/$1.log" >&2; exit 1
}
start a 18601; start b 18602; start c 18603
token=$(cat "$work/s0/admin.token")
firsts=(); lasts=()
for round in $(seq 1 "$kills"); do
  ids=()
  for n in $(seq 1 "$actions"); do
    ids+=("$(curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' \
      -d "{\"kind\":\"sleep\",\"target\":\"r$round-$n\",\"params\":{\"ms\":3000}}" \
      http://127.0.0.1:18602/v1/actions | sed 's/.*"id":\([0-9]*\).*/\1/')")
  done
  list=$(IFS=,; echo "${ids[*]}")
  until [ "$(sql "SELECT COUNT(*) FROM troupe_takeover.actions WHERE id IN ($list) AND status='running' AND owner='b'")" = "$actions" ]; do sleep 0.05; done
  pid=$(cat "$work/b.pid"); kill -9 "$pid"; t0=$(date +%s.%N); first=""; last=""
  wait "$pid" 2>/dev/null || true
  for _ in $(seq 1 600); do
    n=$(sql "SELECT COUNT(*) FROM troupe_takeover.actions WHERE id IN ($list) AND (owner IN ('a','c') OR status <> 'running')")
    now=$(date +%s.%N)
    [ -z "$first" ] && [ "$n" -gt 0 ] && first=$(echo "$now - $t0" | bc)
    if [ "$n" = "$actions" ]; then last=$(echo "$now - $t0" | bc); break; fi
    sleep 0.05
  done
  echo "round $round: first resumed after ${first}s, last after ${last}s"
  firsts+=("$first"); lasts+=("$last")
  start b 18602
  until [ "$(sql "SELECT COUNT(*) FROM troupe_takeover.actions WHERE id IN ($list) AND status <> 'succeeded'")" = 0 ]; do sleep 0.2; done
done
pct() { printf '%s\n' "$@" | sort -n | awk -v p="$P" '{a[NR]=$1} END {i=int((NR-1)*p+0.5)+1; print a[i]}'; }
P=0.5; f50=$(pct "${firsts[@]}"); l50=$(pct "${lasts[@]}"); P=0.99; f99=$(pct "${firsts[@]}"); l99=$(pct "${lasts[@]}")
echo "first resumed: p50 ${f50}s p99 ${f99}s; last resumed: p50 ${l50}s p99 ${l99}s (over $kills kills)"
