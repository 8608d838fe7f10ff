#!/usr/bin/env bash
# One node of the test Galera cluster that start.sh made in DIR.
#
#   node.sh DIR start N [--new-cluster]   start node N (1-3) and wait until it is Synced
#   node.sh DIR kill N                    SIGKILL node N (a host that dies)
#   node.sh DIR stop N                    stop node N cleanly
#   node.sh DIR freeze N                  SIGSTOP node N (a host that stops answering)
#   node.sh DIR thaw N                    SIGCONT node N
#   node.sh DIR state N                   print its wsrep_local_state_comment (Synced, Donor/Desynced, ...)
#
# Node N listens for SQL on 127.0.0.1:BASE+N, for the group on BASE+10+N,
# for IST on BASE+20+N and for rsync SST on BASE+30+N (BASE is in
# DIR/cluster.env). Its data is DIR/nN, its log DIR/nN.err, its pid DIR/nN.pid.
set -euo pipefail
dir=$(cd "$1" && pwd)
cmd=$2
n=$3
# shellcheck source=/dev/null
source "$dir/cluster.env"
sock="$dir/n$n.sock"
pidfile="$dir/n$n.pid"

sql() { mariadb --no-defaults -uroot --socket="$sock" -N -B -e "$1" 2>/dev/null; }

state() { sql "SHOW STATUS LIKE 'wsrep_local_state_comment'" | cut -f2; }

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$cmd" in
start)
  if running; then echo "node $n already runs (pid $(cat "$pidfile"))" >&2; exit 1; fi
  rm -f "$pidfile"
  user_args=()
  if [[ $(id -u) -eq 0 ]]; then
    user_args=(--user=root)
    # Run as root, the rsync SST daemon drops to 'nobody': a joiner's data
    # directory must be writable by it, or SST fails with "Permission
    # denied (13)" (deploy/galera.md).
    if [[ "${4:-}" != "--new-cluster" ]]; then
      mkdir -p "$dir/n$n"
      chown -R nobody:nogroup "$dir/n$n"
      chmod 755 "$dir/n$n"
    fi
  fi
  gcomm="gcomm://127.0.0.1:$((BASE + 11)),127.0.0.1:$((BASE + 12)),127.0.0.1:$((BASE + 13))"
  new=()
  if [[ "${4:-}" == "--new-cluster" ]]; then new=(--wsrep-new-cluster); fi
  # Small: three nodes share a small machine with everything else.
  setsid mariadbd --no-defaults "${user_args[@]}" --datadir="$dir/n$n" --socket="$sock" --pid-file="$pidfile" \
    --port=$((BASE + n)) --bind-address=127.0.0.1 --skip-name-resolve --log-error="$dir/n$n.err" \
    --innodb-buffer-pool-size=32M --performance-schema=OFF --max-connections=300 --max-allowed-packet=128M \
    --binlog-format=ROW --innodb-autoinc-lock-mode=2 \
    --wsrep-on=ON --wsrep-provider=/usr/lib/galera/libgalera_smm.so --wsrep-cluster-name=troupe-test \
    --wsrep-node-name="n$n" --wsrep-node-address="127.0.0.1:$((BASE + 10 + n))" --wsrep-cluster-address="$gcomm" \
    --wsrep-provider-options="gmcast.listen_addr=tcp://127.0.0.1:$((BASE + 10 + n));ist.recv_addr=127.0.0.1:$((BASE + 20 + n));gcache.size=64M" \
    --wsrep-sst-receive-address="127.0.0.1:$((BASE + 30 + n))" --wsrep-sst-method=rsync \
    "${new[@]}" </dev/null >>"$dir/n$n.out" 2>&1 &
  # Until it is Synced (SST from scratch takes a few seconds), at most 120 s.
  for _ in $(seq 1 600); do
    if [[ "$(state)" == "Synced" ]]; then exit 0; fi
    if ! kill -0 $! 2>/dev/null; then
      echo "node $n exited while starting; the end of $dir/n$n.err:" >&2
      tail -30 "$dir/n$n.err" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "node $n did not reach Synced within 120 s; the end of $dir/n$n.err:" >&2
  tail -30 "$dir/n$n.err" >&2
  exit 1
  ;;
kill)
  if running; then
    pid=$(cat "$pidfile")
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  fi
  rm -f "$pidfile"
  ;;
stop)
  if running; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  ;;
freeze | thaw)
  if ! running; then echo "node $n does not run" >&2; exit 1; fi
  if [[ "$cmd" == freeze ]]; then kill -STOP "$(cat "$pidfile")"; else kill -CONT "$(cat "$pidfile")"; fi
  ;;
state)
  state
  ;;
*)
  echo "usage: node.sh DIR start|kill|stop|freeze|thaw|state N" >&2
  exit 2
  ;;
esac
