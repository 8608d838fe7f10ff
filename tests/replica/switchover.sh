#!/usr/bin/env bash
# A planned switchover of the pair start.sh made in DIR, as an operator's
# tool does it (orchestrator, MaxScale's switchover, a runbook):
#
#   bash tests/replica/switchover.sh DIR [PAUSE]
#
# 1. the primary stops taking writes (read_only=ON, which waits for the
#    commits under way);
# 2. the replica applies everything the primary committed (its GTID
#    position), within 30 s or the switchover is abandoned and the primary
#    made writable again;
# 3. the replica stops replicating and becomes writable: the new primary;
# 4. the old primary, still read-only, replicates from the new one.
# PAUSE (seconds, default 0) is waited between 1 and 2, as a slower tool or
# a replica that lags would make it: the time no server takes writes.
# Prints the number (1 or 2) of the new primary.
set -euo pipefail
dir=$(cd "${1:?usage: switchover.sh DIR [PAUSE]}" && pwd)
sql() { mariadb --no-defaults -uroot --socket="$dir/s$1.sock" -N -B -e "$2"; }

if [[ "$(sql 1 'SELECT @@read_only')" == 0 ]]; then old=1 new=2; else old=2 new=1; fi
if [[ "$(sql $new 'SELECT @@read_only')" == 0 ]]; then
  echo "both servers are writable: not a primary/replica pair" >&2
  exit 1
fi
# shellcheck source=/dev/null
source "$dir/pair.env"

sql $old 'SET GLOBAL read_only = ON'
sleep "${2:-0}"
pos=$(sql $old 'SELECT @@gtid_binlog_pos')
if [[ "$(sql $new "SELECT MASTER_GTID_WAIT('$pos', 30)")" != 0 ]]; then
  sql $old 'SET GLOBAL read_only = OFF'
  echo "server $new did not reach the primary's position $pos within 30 s; server $old stays the primary" >&2
  exit 1
fi
sql $new 'STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF'
sql $old "SET GLOBAL gtid_slave_pos = @@gtid_binlog_pos;
  CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=$((BASE + new)), MASTER_USER='repl',
    MASTER_PASSWORD='repl-test', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;
  START SLAVE"
echo "$new"
