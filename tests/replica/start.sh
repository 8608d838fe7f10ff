#!/usr/bin/env bash
# Starts a throwaway MariaDB primary/replica pair on loopback (GTID
# replication from server 1 to server 2, the replica read-only), for the
# tests (tests/tests/e2e/replica.rs) and for trying troupe on one by hand.
#
#   bash tests/replica/start.sh DIR [BASE]
#
# DIR must not exist yet (or be empty). Server N listens on 127.0.0.1:BASE+N
# (BASE defaults to 34600: ports 34601 and 34602). Writes DIR/env, to source:
#   TROUPE_TEST_REPLICA=127.0.0.1:P1,127.0.0.1:P2   (the primary first)
#   TROUPE_TEST_REPLICA_URL=mysql://troupe_test:troupe-test@127.0.0.1:P1,127.0.0.1:P2
#   TROUPE_TEST_REPLICA_DIR=DIR   (switchover.sh DIR, node.sh DIR, stop.sh DIR)
# A user troupe_test (password troupe-test) on both may create databases
# but, like an application's user should, does not write through
# read_only (no READ_ONLY ADMIN); root connects over DIR/sN.sock.
# Switch over with tests/replica/switchover.sh DIR; stop with stop.sh DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: start.sh DIR [BASE]}
base=${2:-34600}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [[ -n "$(ls -A "$dir")" ]]; then echo "$dir is not empty" >&2; exit 1; fi
command -v mariadbd >/dev/null || { echo "mariadbd is missing: install mariadb-server" >&2; exit 1; }

echo "BASE=$base" >"$dir/pair.env"
user_args=()
if [[ $(id -u) -eq 0 ]]; then user_args=(--user=root); fi
for n in 1 2; do
  mariadb-install-db --no-defaults --datadir="$dir/s$n" "${user_args[@]}" --auth-root-authentication-method=normal \
    --skip-test-db >"$dir/install$n.log" 2>&1 || { cat "$dir/install$n.log" >&2; exit 1; }
done
bash "$here/node.sh" "$dir" start 1
bash "$here/node.sh" "$dir" start 2

# The users, made on the primary: replication brings them to the replica.
mariadb --no-defaults -uroot --socket="$dir/s1.sock" <<SQL
CREATE USER 'troupe_test'@'127.0.0.1' IDENTIFIED BY 'troupe-test';
GRANT ALL PRIVILEGES ON *.* TO 'troupe_test'@'127.0.0.1';
REVOKE READ_ONLY ADMIN ON *.* FROM 'troupe_test'@'127.0.0.1';
CREATE USER 'repl'@'127.0.0.1' IDENTIFIED BY 'repl-test';
GRANT REPLICATION SLAVE ON *.* TO 'repl'@'127.0.0.1';
SQL
mariadb --no-defaults -uroot --socket="$dir/s2.sock" <<SQL
SET GLOBAL read_only = ON;
CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=$((base + 1)), MASTER_USER='repl',
  MASTER_PASSWORD='repl-test', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;
START SLAVE;
SQL
# Caught up: the replica has the primary's last transaction.
pos=$(mariadb --no-defaults -uroot --socket="$dir/s1.sock" -N -B -e 'SELECT @@gtid_binlog_pos')
got=$(mariadb --no-defaults -uroot --socket="$dir/s2.sock" -N -B -e "SELECT MASTER_GTID_WAIT('$pos', 30)")
if [[ "$got" != 0 ]]; then
  echo "the replica did not catch up with the primary ($pos) within 30 s:" >&2
  mariadb --no-defaults -uroot --socket="$dir/s2.sock" -e 'SHOW SLAVE STATUS\G' >&2
  exit 1
fi
cat >"$dir/env" <<ENV
export TROUPE_TEST_REPLICA=127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))
export TROUPE_TEST_REPLICA_URL=mysql://troupe_test:troupe-test@127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))
export TROUPE_TEST_REPLICA_DIR=$dir
ENV
cat "$dir/env"
