#!/usr/bin/env bash
# Starts a throwaway three-node MariaDB Galera cluster on loopback, for the
# tests (tests/tests/e2e/galera.rs) and for trying troupe on one by hand.
#
#   bash tests/galera/start.sh DIR [BASE]
#
# DIR must not exist yet (or be empty). Node N listens for SQL on
# 127.0.0.1:BASE+N (BASE defaults to 34400: ports 34401-34403, and
# BASE+11.. BASE+33 for the group, IST and SST). Writes DIR/env, to source:
#   TROUPE_TEST_GALERA=127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
#   TROUPE_TEST_GALERA_DIR=DIR (tests/galera/node.sh DIR kill|start N)
# and a user troupe_test (password troupe-test) with every privilege.
# Stop it with tests/galera/stop.sh DIR. Needs root or an installed galera-4
# and rsync (installed with apt when missing and this is root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: start.sh DIR [BASE]}
base=${2:-34400}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [[ -n "$(ls -A "$dir")" ]]; then echo "$dir is not empty" >&2; exit 1; fi

missing=()
[[ -f /usr/lib/galera/libgalera_smm.so ]] || missing+=(galera-4)
command -v rsync >/dev/null || missing+=(rsync)
command -v mariadbd >/dev/null || missing+=(mariadb-server)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "${missing[*]} missing and this is not root: install them" >&2
    exit 1
  fi
  echo "installing ${missing[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "BASE=$base" >"$dir/cluster.env"
user_args=()
if [[ $(id -u) -eq 0 ]]; then user_args=(--user=root); fi
mariadb-install-db --no-defaults --datadir="$dir/n1" "${user_args[@]}" --auth-root-authentication-method=normal \
  --skip-test-db >"$dir/install.log" 2>&1 || { cat "$dir/install.log" >&2; exit 1; }

bash "$here/node.sh" "$dir" start 1 --new-cluster
mariadb --no-defaults -uroot --socket="$dir/n1.sock" <<SQL
CREATE USER 'troupe_test'@'127.0.0.1' IDENTIFIED BY 'troupe-test';
GRANT ALL PRIVILEGES ON *.* TO 'troupe_test'@'127.0.0.1';
SQL
bash "$here/node.sh" "$dir" start 2
bash "$here/node.sh" "$dir" start 3

size=$(mariadb --no-defaults -uroot --socket="$dir/n1.sock" -N -B -e "SHOW STATUS LIKE 'wsrep_cluster_size'" | cut -f2)
if [[ "$size" != 3 ]]; then echo "the cluster has $size nodes, not 3" >&2; exit 1; fi
cat >"$dir/env" <<ENV
export TROUPE_TEST_GALERA=127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))
export TROUPE_TEST_GALERA_DIR=$dir
ENV
cat "$dir/env"
