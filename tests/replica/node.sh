#!/usr/bin/env bash
# One server of the test primary/replica pair that start.sh made in DIR.
#
#   node.sh DIR start N     start server N (1 or 2) and wait until it answers
#   node.sh DIR stop N      stop server N cleanly
#   node.sh DIR kill N      SIGKILL server N (a host that dies)
#
# Server N listens on 127.0.0.1:BASE+N (BASE is in DIR/pair.env), with its
# data in DIR/sN, its socket DIR/sN.sock, its log DIR/sN.err.
set -euo pipefail
dir=$(cd "$1" && pwd)
cmd=$2
n=$3
# shellcheck source=/dev/null
source "$dir/pair.env"
sock="$dir/s$n.sock"
pidfile="$dir/s$n.pid"

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$cmd" in
start)
  if running; then echo "server $n already runs (pid $(cat "$pidfile"))" >&2; exit 1; fi
  rm -f "$pidfile"
  user_args=()
  if [[ $(id -u) -eq 0 ]]; then user_args=(--user=root); fi
  # Small, loopback only; binary logs with GTIDs on both (either may be the
  # primary), and a replica's applied transactions logged too, so the old
  # primary can follow the new one after a switchover.
  setsid mariadbd --no-defaults "${user_args[@]}" --datadir="$dir/s$n" --socket="$sock" --pid-file="$pidfile" \
    --port=$((BASE + n)) --bind-address=127.0.0.1 --skip-name-resolve --log-error="$dir/s$n.err" \
    --innodb-buffer-pool-size=32M --performance-schema=OFF --max-connections=300 --max-allowed-packet=128M \
    --server-id="$n" --log-bin="$dir/s$n/binlog" --log-slave-updates=ON --binlog-format=ROW \
    --gtid-strict-mode=ON --relay-log="$dir/s$n/relay" --skip-slave-start \
    </dev/null >>"$dir/s$n.out" 2>&1 &
  for _ in $(seq 1 300); do
    if mariadb --no-defaults -uroot --socket="$sock" -e 'SELECT 1' >/dev/null 2>&1; then exit 0; fi
    if ! kill -0 $! 2>/dev/null; then
      echo "server $n exited while starting; the end of $dir/s$n.err:" >&2
      tail -30 "$dir/s$n.err" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "server $n did not answer within 60 s; the end of $dir/s$n.err:" >&2
  tail -30 "$dir/s$n.err" >&2
  exit 1
  ;;
kill | stop)
  if running; then
    pid=$(cat "$pidfile")
    if [[ "$cmd" == kill ]]; then kill -KILL "$pid"; else kill -TERM "$pid"; fi
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  ;;
*)
  echo "usage: node.sh DIR start|stop|kill N" >&2
  exit 2
  ;;
esac
