#!/usr/bin/env bash
# Stops the test primary/replica pair start.sh made in DIR (its files stay).
#
#   bash tests/replica/stop.sh DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: stop.sh DIR}
for n in 2 1; do bash "$here/node.sh" "$dir" stop "$n" || true; done
