#!/usr/bin/env bash
# datasaver quick start: see a backup and a restore work end to end, locally.
#
#   bash deploy/quickstart.sh [--clean] [--keep-running] [--workdir DIR]
#                             [--no-deps] [--no-build]
#
# On a Debian machine (as root, or as a user with sudo for the package
# install) it:
#   1. installs missing packages (scripts/install-deps.sh) and builds the
#      release binaries (cargo build --release --workspace);
#   2. starts a throwaway PostgreSQL 15 cluster on a free loopback port (password
#      auth over TCP, the password in a 0600 file) and loads a sample shop
#      database `demo`;
#   3. creates a fleet CA and certificates (dsctl certs init / issue);
#   4. starts a coordinator (local storage) and an agent for target `demo`;
#   5. runs `dsctl backup demo`, `dsctl list`,
#      `dsctl restore <id> --target-db demo_restored`;
#   6. compares row counts and a content checksum of every table (and the
#      schema) in `demo` and `demo_restored`, and fails if anything differs.
# Everything it started is stopped when it exits (also on error or Ctrl-C).
#
# Options:
#   --workdir DIR    where certs, logs, coordinator data go (default ./.demo in
#                    the repository; wiped at start)
#   --clean          delete the work dir at the end (default: keep it, with logs)
#   --keep-running   after the demo, keep everything running until Ctrl-C and
#                    print the environment to use dsctl by hand
#   --no-deps        skip scripts/install-deps.sh
#   --no-build       skip cargo build (use the existing target/release binaries)
#
# Environment: DATASAVER_BIN_DIR=DIR uses the binaries in DIR (no cargo build);
# DATASAVER_PG_BIN_DIR (default /usr/lib/postgresql/15/bin) the Postgres tools.
set -euo pipefail

ORIG_PWD=$PWD
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

clean=0
keep_running=0
deps=1
build=1
workdir=.demo
while (($#)); do
    case "$1" in
        --clean) clean=1 ;;
        --keep-running) keep_running=1 ;;
        --no-deps) deps=0 ;;
        --no-build) build=0 ;;
        --workdir)
            [[ $# -ge 2 ]] || die "--workdir needs a directory"
            workdir=$2
            [[ "$workdir" = /* ]] || workdir="$ORIG_PWD/$workdir"
            shift
            ;;
        --workdir=*)
            workdir=${1#--workdir=}
            [[ "$workdir" = /* ]] || workdir="$ORIG_PWD/$workdir"
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

TARGET=demo
AGENT_NAME=demo-agent
RESTORED_DB=demo_restored

# ------------------------------------------------------------------ 1. deps, build
if ((deps)); then
    step "Installing missing system packages (scripts/install-deps.sh)"
    bash scripts/install-deps.sh
fi
if ((build)) && [[ -z "${DATASAVER_BIN_DIR:-}" ]]; then
    step "Building release binaries (cargo build --release --workspace)"
    cargo build --release --workspace
fi
ds_find_bins release ||
    die "release binaries not found in ${DS_BIN_DIR} (run without --no-build)"
info "binaries: $DS_BIN_DIR/{datasaver-coordinator,datasaver-agent,dsctl}"

# ------------------------------------------------------------------ work dir
step "Preparing work dir $workdir"
MARKER=.datasaver-quickstart
if [[ -e "$workdir" ]]; then
    if [[ -e "$workdir/$MARKER" ]] || [[ -d "$workdir" && -z "$(ls -A "$workdir")" ]]; then
        rm -rf "$workdir"
    else
        die "$workdir exists and was not made by this script; refusing to wipe it (use --workdir)"
    fi
fi
mkdir -p "$workdir"
WORK=$(cd "$workdir" && pwd)
touch "$WORK/$MARKER"
mkdir -m 0700 "$WORK/secrets"
if ((clean)); then
    ds_register_cleanup rm -rf "$WORK"
else
    ds_register_cleanup info "work dir kept: $WORK (logs: coordinator.log, agent.log, postgres.log)"
fi
info "$WORK"

# ------------------------------------------------------------------ 2. Postgres
step "Starting a throwaway PostgreSQL 15 cluster"
PWFILE="$WORK/secrets/db-password"
(
    umask 077
    # 192 random bits as hex; written to a 0600 file, never on a command line.
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$PWFILE"
)
ds_pg_init demo "$PWFILE"
ds_pg_start "$WORK/postgres.log"
info "postgres pid $DS_PG_PID, 127.0.0.1:$DS_PG_PORT (socket dir $DS_PG_HOST), log $WORK/postgres.log"
info "role postgres, scram-sha-256 over TCP, password in $PWFILE (mode $(stat -c %a "$PWFILE"))"

step "Loading sample data into database '$TARGET'"
ds_psql postgres -c "CREATE DATABASE $TARGET"
ds_psql "$TARGET" -f scripts/sql/demo-data.sql >/dev/null
# Prove the agent's way in (TCP + password) works before involving datasaver.
PGPASSWORD=$(cat "$PWFILE") "$DS_PG_BIN_DIR/psql" -X -q -At -h 127.0.0.1 -p "$DS_PG_PORT" \
    -U postgres -d "$TARGET" -c 'SELECT 1' >/dev/null ||
    die "cannot log in to Postgres over TCP with the generated password"
ds_psql "$TARGET" -c "
    SELECT c.relname AS table, c.reltuples::bigint AS rows,
           pg_size_pretty(pg_total_relation_size(c.oid)) AS size
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND n.nspname = 'public' ORDER BY 1"
info "database size: $(ds_psql_val "$TARGET" "SELECT pg_size_pretty(pg_database_size(current_database()))")"

# ------------------------------------------------------------------ 3. certificates
step "Creating the fleet CA and certificates"
ds_certs "$WORK/certs" "$AGENT_NAME" "$TARGET"
CERTS=$DS_CERTS
find "$CERTS" -type f -printf '    %M %s %P\n' | sort -k3

# ------------------------------------------------------------------ 4. coordinator, agent
step "Starting the coordinator (local storage under $WORK/coordinator)"
ds_start_coordinator "$WORK/coordinator" "$WORK/coordinator.log"
info "coordinator pid $DS_COORDINATOR_PID, gRPC $DS_COORDINATOR_URL, HTTP 127.0.0.1:$DS_HTTP_PORT, log $WORK/coordinator.log"

step "Starting the agent '$AGENT_NAME' for target '$TARGET'"
ds_start_agent "$AGENT_NAME" "$TARGET" "$TARGET" "$PWFILE" "$WORK/agent.log"
info "agent pid $DS_AGENT_PID, database $TARGET at 127.0.0.1:$DS_PG_PORT, log $WORK/agent.log"

step "Waiting for the agent to connect"
ds_show dsctl agents
ds_wait_agent "$TARGET" 30
printf '%s\n' "$DS_AGENTS_OUT" | sed 's/^/    /'

# ------------------------------------------------------------------ 5. backup, list, restore
step "Backing up target '$TARGET'"
ds_show dsctl backup "$TARGET" --label quickstart
backup_out=$(ds_dsctl backup "$TARGET" --label quickstart) ||
    ds_fail_with_logs "dsctl backup failed"
printf '%s\n' "$backup_out" | sed 's/^/    /'
BACKUP_ID=$(printf '%s\n' "$backup_out" | awk 'NF {last = $0} END {gsub(/^[ \t]+|[ \t]+$/, "", last); print last}')
[[ "$BACKUP_ID" =~ ^${TARGET}_[0-9]{8}_[0-9]{6}([_-][A-Za-z0-9]+)?$ ]] ||
    die "dsctl backup did not print a backup id as its last line (got: '$BACKUP_ID')"
info "backup id: $BACKUP_ID"

step "Listing backups"
ds_show dsctl list
ds_dsctl list | sed 's/^/    /'
objects=$(find "$WORK/coordinator" -path "*/$TARGET/logical/$BACKUP_ID.*" -type f 2>/dev/null | sort)
if [[ -n "$objects" ]]; then
    info "stored objects:"
    while read -r f; do
        info "  $(stat -c '%s bytes  %A' "$f")  ${f#"$WORK"/}"
    done <<<"$objects"
fi

step "Restoring $BACKUP_ID into a new database '$RESTORED_DB'"
ds_show dsctl restore "$BACKUP_ID" --target-db "$RESTORED_DB"
ds_dsctl restore "$BACKUP_ID" --target-db "$RESTORED_DB" 2>&1 | sed 's/^/    /' ||
    ds_fail_with_logs "dsctl restore failed"
[[ "$(ds_psql_val postgres "SELECT count(*) FROM pg_database WHERE datname = '$RESTORED_DB'")" == 1 ]] ||
    die "database $RESTORED_DB does not exist after the restore"

# ------------------------------------------------------------------ 6. compare
step "Comparing '$TARGET' and '$RESTORED_DB'"
# Per table: row count and md5 over all rows in a canonical order.
table_stats() {
    local db=$1 t
    for t in $(ds_psql_val "$TARGET" "
        SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables
        WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"); do
        if [[ "$(ds_psql_val "$db" "SELECT to_regclass('$t') IS NOT NULL")" == t ]]; then
            ds_psql_val "$db" "SELECT '$t', count(*), md5(coalesce(string_agg(x::text, E'\n' ORDER BY x::text), '')) FROM $t x" |
                tr '|' ' '
        else
            echo "$t - missing"
        fi
    done
}
mapfile -t src < <(table_stats "$TARGET")
mapfile -t dst < <(table_stats "$RESTORED_DB")
dst_table_count=$(ds_psql_val "$RESTORED_DB" "
    SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")

printf '\n    %-22s %10s %10s   %-32s %-32s %s\n' TABLE "$TARGET" "$RESTORED_DB" "md5 ($TARGET)" "md5 ($RESTORED_DB)" ""
mismatch=0
for i in "${!src[@]}"; do
    read -r t n1 h1 <<<"${src[$i]}"
    read -r _ n2 h2 <<<"${dst[$i]:-x - missing}"
    verdict=same
    if [[ "$n1" != "$n2" || "$h1" != "$h2" ]]; then
        verdict=DIFFERENT
        mismatch=1
    fi
    printf '    %-22s %10s %10s   %-32s %-32s %s\n' "$t" "$n1" "$n2" "$h1" "$h2" "$verdict"
done
if [[ "$dst_table_count" != "${#src[@]}" ]]; then
    info "table count differs: $TARGET has ${#src[@]}, $RESTORED_DB has $dst_table_count"
    mismatch=1
fi

# The schema (tables, constraints, indexes, views, sequences, comments) too.
"$DS_PG_BIN_DIR/pg_dump" -s -h "$DS_PG_HOST" -p "$DS_PG_PORT" -U postgres "$TARGET" |
    grep -v '^\\restrict\|^\\unrestrict' >"$WORK/schema-$TARGET.sql"
"$DS_PG_BIN_DIR/pg_dump" -s -h "$DS_PG_HOST" -p "$DS_PG_PORT" -U postgres "$RESTORED_DB" |
    grep -v '^\\restrict\|^\\unrestrict' >"$WORK/schema-$RESTORED_DB.sql"
if diff -u "$WORK/schema-$TARGET.sql" "$WORK/schema-$RESTORED_DB.sql" >"$WORK/schema.diff"; then
    info "schema: identical ($(grep -c . "$WORK/schema-$TARGET.sql") lines of pg_dump --schema-only)"
else
    info "schema: DIFFERENT (see $WORK/schema.diff)"
    head -n 40 "$WORK/schema.diff" | sed 's/^/    /'
    mismatch=1
fi

if ((mismatch)); then
    die "the restored database differs from the original"
fi
step "Success: '$RESTORED_DB' is identical to '$TARGET' (row counts, per-table checksums, schema)"

if ((keep_running)); then
    cat <<EOF

Everything is still running. In another shell:

    export DATASAVER_COORDINATOR_URL=$DS_COORDINATOR_URL
    export DATASAVER_TLS_CA=$CERTS/ca.crt
    export DATASAVER_TLS_CERT=$CERTS/operator.crt
    export DATASAVER_TLS_KEY=$CERTS/operator.key
    $DS_DSCTL list
    curl -s http://127.0.0.1:$DS_HTTP_PORT/health

    psql -h $DS_PG_HOST -p $DS_PG_PORT -U postgres $TARGET

Press Ctrl-C to stop everything.
EOF
    while ds_alive "$DS_COORDINATOR_PID"; do
        sleep 1
    done
    warn "the coordinator exited"
fi
