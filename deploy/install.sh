#!/usr/bin/env bash
# Installs troupe from this source tree: the binary in PREFIX/bin, the
# step libraries it ships (the built-in bundle's, the hardware bundle's and the benchmark's) in
# PREFIX/lib/troupe, where the binary looks for them, its man pages in
# PREFIX/share/man/man1 and its bash, zsh and fish completions under
# PREFIX/share.
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
man=$(mktemp -d)
trap 'rm -rf "$man"' EXIT
"$prefix/bin/troupe" man --out "$man" 2>/dev/null
install -d "$prefix/share/man/man1"
install -m 0644 "$man"/*.1 "$prefix/share/man/man1/"
install -d "$prefix/share/bash-completion/completions" "$prefix/share/zsh/site-functions" \
  "$prefix/share/fish/vendor_completions.d"
"$prefix/bin/troupe" completions bash >"$prefix/share/bash-completion/completions/troupe"
"$prefix/bin/troupe" completions zsh >"$prefix/share/zsh/site-functions/_troupe"
"$prefix/bin/troupe" completions fish >"$prefix/share/fish/vendor_completions.d/troupe.fish"
echo "installed $prefix/bin/troupe, its step libraries in $prefix/lib/troupe, man pages and shell completions"
echo "try: troupe demo"
