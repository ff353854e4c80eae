#!/usr/bin/env bash
# Install the S3-compatible server the tests run (s3s-fs, from crates.io) into DIR and print
# the path of its binary on stdout:
#
#   tests/install-s3-server.sh [DIR]      (DIR defaults to /opt/datasaver-test-s3)
#
# The harness (tests/src/s3.rs) finds /opt/datasaver-test-s3/bin/s3s-fs by itself; for another
# DIR, export DATASAVER_TEST_S3S_FS="$(tests/install-s3-server.sh DIR)".
#
# Why s3s-fs: real SigV4 authentication, multipart uploads, ranged GETs, ListObjectsV2
# pagination and DeleteObjects, in one small Rust binary that builds with this toolchain.
# Pinned to 0.14.1 (later versions need a newer rustc), built with its own published
# Cargo.lock (--locked) and apart from the workspace, so its dependencies never mix with ours.
# Takes ~100 s the first time; idempotent afterwards (only checks the version).
set -euo pipefail

VERSION="${DATASAVER_TEST_S3S_FS_VERSION:-0.14.1}"
dir="${1:-/opt/datasaver-test-s3}"
bin="$dir/bin/s3s-fs"
log() { echo "install-s3-server: $*" >&2; }

if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "$VERSION"; then
    log "s3s-fs $VERSION present"
    echo "$bin"
    exit 0
fi
command -v cargo >/dev/null || { log "cargo not found"; exit 1; }
log "cargo install s3s-fs@$VERSION (about 100 s)"
# Its own target dir, removed afterwards: it must not reuse or pollute the workspace's.
build_dir="$(mktemp -d /tmp/s3s-fs-build.XXXXXX)"
trap 'rm -rf "$build_dir"' EXIT
CARGO_TARGET_DIR="$build_dir" cargo install "s3s-fs@$VERSION" --locked --features binary \
    --root "$dir" --quiet >&2
"$bin" --version >&2
echo "$bin"
