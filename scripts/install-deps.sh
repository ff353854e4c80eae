#!/usr/bin/env bash
# Install what building and testing datasaver needs, if it is missing.
#
#   bash scripts/install-deps.sh
#
# Idempotent and non-interactive (safe under CI=true with no stdin).  Targets
# Debian 12: installs postgresql-15 (server + client tools, used by the agent
# and by the integration tests' throwaway clusters), zstd (the benchmark's
# baseline) and python3 (free-port helper, JSON parsing in the scripts).
# Checks that the Rust toolchain (cargo, rustfmt, clippy) and a C compiler are
# there.  cargo-nextest is not needed: the test suite runs with plain
# `cargo test`.
#
# It never starts a PostgreSQL service.  Debian's package creates a cluster
# `15/main` (port 5432) and would try to start it; a policy-rc.d is put in
# place for the duration of the install so that it stays stopped.  Nothing in
# datasaver uses that cluster: the tests and scripts make their own on free
# ports.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
PG_MAJOR=15
PG_BIN_DIR=/usr/lib/postgresql/$PG_MAJOR/bin

say() { printf 'install-deps: %s\n' "$*"; }
die() {
    printf 'install-deps: ERROR: %s\n' "$*" >&2
    exit 1
}

SUDO=()
if ((EUID != 0)); then
    SUDO=(sudo)
fi
as_root() {
    if ((${#SUDO[@]})) && ! command -v sudo >/dev/null 2>&1; then
        die "need root to run: $* (run as root, or install sudo)"
    fi
    "${SUDO[@]}" "$@" </dev/null
}

# ---------------------------------------------------------------- what is missing
missing=()

if [[ -x "$PG_BIN_DIR/initdb" && -x "$PG_BIN_DIR/pg_dump" && -x "$PG_BIN_DIR/pg_restore" && -x "$PG_BIN_DIR/psql" ]]; then
    say "postgresql-$PG_MAJOR present ($("$PG_BIN_DIR/postgres" --version))"
else
    say "postgresql-$PG_MAJOR missing: will install"
    missing+=("postgresql-$PG_MAJOR")
fi

if command -v zstd >/dev/null 2>&1; then
    say "zstd present ($(zstd -V | head -n1))"
else
    say "zstd missing: will install"
    missing+=(zstd)
fi

if command -v python3 >/dev/null 2>&1; then
    say "python3 present ($(python3 --version 2>&1))"
else
    say "python3 missing: will install"
    missing+=(python3)
fi

if command -v cc >/dev/null 2>&1; then
    say "C compiler present ($(cc --version | head -n1))"
else
    say "C compiler missing: will install gcc and libc6-dev"
    missing+=(gcc libc6-dev)
fi

if ! command -v setpriv >/dev/null 2>&1; then
    # util-linux is essential on Debian, but be explicit: the scripts use setpriv
    # to run postgres as the `postgres` user when started as root.
    missing+=(util-linux)
fi

# ---------------------------------------------------------------- install
if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install manually: ${missing[*]}"

    # Refresh the package lists only if apt does not know a package we need.
    need_update=0
    for p in "${missing[@]}"; do
        if ! apt-cache show --no-all-versions "$p" >/dev/null 2>&1; then
            need_update=1
        fi
    done
    if ((need_update)); then
        say "running apt-get update (package lists do not know: ${missing[*]})"
        as_root apt-get -o DPkg::Lock::Timeout=900 update -q
    fi

    # Keep Debian's postinst from starting the 15/main cluster (no systemd here
    # anyway): invoke-rc.d honours policy-rc.d exit status 101 = "not allowed".
    added_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        say "temporarily installing /usr/sbin/policy-rc.d so no service is started"
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d'
        added_policy=1
    fi
    remove_policy() {
        if ((added_policy)); then
            as_root rm -f /usr/sbin/policy-rc.d
            added_policy=0
        fi
    }
    trap remove_policy EXIT

    install_cmd=(apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends "${missing[@]}")
    say "running: ${install_cmd[*]}"
    if ! as_root "${install_cmd[@]}"; then
        # Stale package lists give 404s: refresh once and retry.
        say "install failed; refreshing package lists and retrying once"
        as_root apt-get -o DPkg::Lock::Timeout=900 update -q
        as_root "${install_cmd[@]}"
    fi
    remove_policy
    trap - EXIT
else
    say "all system packages present; nothing to install"
fi

[[ -x "$PG_BIN_DIR/initdb" ]] || die "$PG_BIN_DIR/initdb still missing after install"

# ---------------------------------------------------------------- port 5432
# Nothing of ours uses the packaged cluster; just make sure it is not in our
# way and tell the user if some other server holds 5432.
main_pid_file=/var/run/postgresql/$PG_MAJOR-main.pid
if [[ -s "$main_pid_file" ]] && kill -0 "$(head -n1 "$main_pid_file")" 2>/dev/null; then
    say "note: the packaged cluster $PG_MAJOR/main is running (pid $(head -n1 "$main_pid_file")); datasaver's tests do not use it (they use their own clusters on free ports)"
elif (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    say "note: something listens on 127.0.0.1:5432; datasaver's tests do not use that port"
else
    say "no PostgreSQL server running on port 5432 (good: nothing to collide with)"
fi

# ---------------------------------------------------------------- Rust toolchain
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install a Rust toolchain (rustup, stable, with rustfmt and clippy)"
say "cargo present ($(cargo --version))"
for tool in fmt:rustfmt clippy:clippy; do
    sub=${tool%%:*} component=${tool#*:}
    if cargo "$sub" --version >/dev/null 2>&1; then
        say "$component present ($(cargo "$sub" --version))"
    elif command -v rustup >/dev/null 2>&1 && rustup component add "$component" >/dev/null 2>&1; then
        say "$component installed with rustup"
    else
        die "cargo $sub not available: rustup component add $component"
    fi
done

say "done"
