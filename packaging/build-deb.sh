#!/usr/bin/env bash
# Build the release `delegate` binary and the delegate-agent .deb with cargo-deb.
#
#   packaging/build-deb.sh [OUT_DIR]      # default OUT_DIR: <target dir>/debian
#
# Prints the path of the .deb on the last line of stdout. Honours CARGO_TARGET_DIR (the release
# build is shared with everything else that builds in the same target dir). Needs cargo-deb:
#   cargo install cargo-deb --locked
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || {
    echo "cargo-deb is not installed: cargo install cargo-deb --locked" >&2
    exit 1
}

target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
out_dir=${1:-$target_dir/debian}
mkdir -p "$out_dir"

# Build once here (a no-op when up to date), then let cargo-deb package without rebuilding.
nice -n 10 cargo build --release -p delegate-agent --bin delegate >&2
# cargo-deb prints the path of the package it wrote on stdout.
deb=$(cargo deb -p delegate-agent --no-build --output "$out_dir" | tail -n 1)
[ -f "$deb" ] || { echo "cargo deb did not report a package file (got: $deb)" >&2; exit 1; }
echo "$deb"
