#!/usr/bin/env bash
# Installs troupe from this source tree: the binary in PREFIX/bin and the
# step libraries it ships (the built-in bundle's, the hardware bundle's and
# the benchmark's) in PREFIX/lib/troupe, where the binary looks for them.
#
#   deploy/install.sh [PREFIX]      # default PREFIX: /usr/local
#
# Builds a release first (cargo, offline once the dependencies are fetched).
set -euo pipefail
prefix=${1:-/usr/local}
cd "$(dirname "$0")/.."
cargo build --release --locked -p troupe -p builtin -p hardware -p testkit
install -d "$prefix/bin" "$prefix/lib/troupe"
install -m 0755 target/release/troupe "$prefix/bin/troupe"
install -m 0644 target/release/libbuiltin.so target/release/libhardware.so \
  target/release/libtestkit.so "$prefix/lib/troupe/"
echo "installed $prefix/bin/troupe and its step libraries in $prefix/lib/troupe"
echo "try: troupe demo"
