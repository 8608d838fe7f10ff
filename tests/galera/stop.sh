#!/usr/bin/env bash
# Stops the test Galera cluster start.sh made in DIR (its files stay).
#
#   bash tests/galera/stop.sh DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: stop.sh DIR}
for n in 3 2 1; do bash "$here/node.sh" "$dir" stop "$n" || true; done
